"""``run_all.report_paths``: a bench run never overwrites a report of the same day."""

from __future__ import annotations

from pathlib import Path

from tests.bench.run_all import report_paths


def test_an_earlier_report_is_kept(tmp_path: Path) -> None:
    assert report_paths(tmp_path, "2026-12-05-vm.host") == (
        tmp_path / "2026-12-05-vm.host.json",
        tmp_path / "2026-12-05-vm.host.md",
    )
    (tmp_path / "2026-12-05-vm.host.json").write_text("{}")
    assert report_paths(tmp_path, "2026-12-05-vm.host")[0].name == "2026-12-05-vm.host-2.json"
    (tmp_path / "2026-12-05-vm.host-2.md").write_text("")  # either file marks the name taken
    assert report_paths(tmp_path, "2026-12-05-vm.host")[1].name == "2026-12-05-vm.host-3.md"
