"""``lookback.reference``: the generated tables of docs/ equal what the code declares, and
``lookback docs`` finds and fixes a stale page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lookback.cli import main
from lookback.metrics import Metrics
from lookback.reference import (
    BEGIN,
    END,
    PAGES,
    generated_block,
    metrics_markdown,
    settings_markdown,
    splice,
)
from lookback.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rel", sorted(PAGES))
def test_committed_page_equals_its_generated_table(rel: str) -> None:
    text = (REPO / rel).read_text(encoding="utf-8")
    assert generated_block(text) == PAGES[rel](), f"{rel} is stale: run `lookback docs --write`"


def test_configuration_table_has_every_setting_with_its_default() -> None:
    rows = {ln.split("`")[1]: ln for ln in settings_markdown().splitlines() if ln.startswith("| `")}
    assert list(rows) == [f"LOOKBACK_{name.upper()}" for name in Settings.model_fields]
    assert "| `1000` | int, >= 1 |" in rows["LOOKBACK_MAX_SESSIONS"]
    assert "`auto` \\| `cpu` \\| `cuda`" in rows["LOOKBACK_PROVIDERS"]
    assert "| `1,8,64` | list of int" in rows["LOOKBACK_WARMUP_BATCH_SIZES"]


def test_metrics_table_has_every_registered_family() -> None:
    names = {ln.split("`")[1] for ln in metrics_markdown().splitlines() if ln.startswith("| `")}
    families = set()
    for fam in Metrics().registry.collect():
        families.add(fam.name + ("_total" if fam.type == "counter" else ""))
    assert names == families


def test_splice_replaces_only_the_block() -> None:
    text = f"intro\n\n{BEGIN}\nold\n{END}\n\noutro\n"
    out = splice(text, "new table")
    assert out == f"intro\n\n{BEGIN}\nnew table\n{END}\n\noutro\n"
    assert generated_block(out) == "new table"
    with pytest.raises(ValueError, match="markers"):
        generated_block("no markers")


def test_docs_command_reports_then_fixes_a_stale_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "configuration.md"
    page.write_text(splice(page.read_text(encoding="utf-8"), "| stale |"), encoding="utf-8")
    assert main(["docs", "--root", str(tmp_path)]) == 1
    assert "out of date: docs/configuration.md" in capsys.readouterr().err
    assert main(["docs", "--root", str(tmp_path), "--write"]) == 0
    assert main(["docs", "--root", str(tmp_path)]) == 0
    assert page.read_text(encoding="utf-8") == (REPO / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    )
