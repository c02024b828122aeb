"""The README is the front door: its links resolve, and the error tables it points to
(``docs/errors.md``) are the ones ``lookback protocol`` generates."""

from __future__ import annotations

import re
from pathlib import Path

from lookback.protocol import CLOSE_CODES, ERRORS, markdown_tables
from lookback.reference import PAGES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ERRORS_PAGE = REPO / "docs" / "errors.md"


def _lines() -> list[str]:
    assert ERRORS_PAGE.is_file(), "docs/errors.md is missing"
    return ERRORS_PAGE.read_text(encoding="utf-8").splitlines()


def test_every_error_code_is_in_the_errors_table() -> None:
    rows = {line.split("`")[1]: line for line in _lines() if line.startswith("| `")}
    missing = [code for code in ERRORS if code not in rows]
    assert not missing, f"docs/errors.md lacks {missing}: regenerate it with `lookback docs --write`"
    for code, spec in ERRORS.items():
        assert f"| {spec.http} |" in rows[code], code
        ws = f"closes {int(spec.close)}" if spec.close is not None else "stays open"
        assert ws in rows[code], code


def test_every_close_code_is_in_the_errors_table() -> None:
    lines = _lines()
    missing = [int(c) for c in CLOSE_CODES if not any(ln.startswith(f"| {int(c)} |") for ln in lines)]
    assert not missing, f"docs/errors.md close-code table lacks {missing}"


def test_errors_tables_match_the_generated_ones() -> None:
    """Verbatim, so a changed summary or status in protocol.py cannot drift from the docs."""
    assert markdown_tables() in ERRORS_PAGE.read_text(encoding="utf-8"), (
        "docs/errors.md tables differ from `lookback protocol`: run `lookback docs --write`"
    )


def test_readme_links_every_reference_page_and_every_link_resolves() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert not [t for t in local if not (REPO / t).exists()], "README links a file that is not there"
    assert set(PAGES) <= set(local), "README must link every generated reference page"
    for page in (REPO / "docs").glob("*.md"):
        for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in t:
                assert (page.parent / t).exists(), f"{page.name} links {t}, which is not there"


def test_readme_anchors_resolve() -> None:
    """In-page links (#section) name a heading of the README, as GitHub slugs it."""
    text = README.read_text(encoding="utf-8")
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        slugs.add(slug)
    anchors = re.findall(r"\]\(#([^)]+)\)", text)
    assert anchors and not [a for a in anchors if a not in slugs]
