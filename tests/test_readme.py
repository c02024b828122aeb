"""README's "Errors and limits" tables are the ones ``lookback protocol`` generates."""

from __future__ import annotations

from pathlib import Path

from lookback.protocol import CLOSE_CODES, ERRORS, markdown_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def _lines() -> list[str]:
    assert README.is_file(), "README.md is missing"
    return README.read_text(encoding="utf-8").splitlines()


def test_every_error_code_is_in_the_readme_table() -> None:
    rows = {line.split("`")[1]: line for line in _lines() if line.startswith("| `")}
    missing = [code for code in ERRORS if code not in rows]
    assert not missing, f"README errors table lacks {missing}: regenerate it with `lookback protocol`"
    for code, spec in ERRORS.items():
        assert f"| {spec.http} |" in rows[code], code
        ws = f"closes {int(spec.close)}" if spec.close is not None else "stays open"
        assert ws in rows[code], code


def test_every_close_code_is_in_the_readme_table() -> None:
    lines = _lines()
    missing = [int(c) for c in CLOSE_CODES if not any(ln.startswith(f"| {int(c)} |") for ln in lines)]
    assert not missing, f"README close-code table lacks {missing}"


def test_readme_tables_match_the_generated_ones() -> None:
    """Verbatim, so a changed summary or status in protocol.py cannot drift from the docs."""
    assert markdown_tables() in README.read_text(encoding="utf-8"), (
        "README tables differ from `lookback protocol`; paste its output into README.md"
    )
