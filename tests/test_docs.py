"""The docs stand on their own: no pointer to files users do not have, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED = [*DOCS, *sorted((REPO / "uegr_dist").rglob("*.py")), *sorted((REPO / "examples").rglob("*.py"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_nothing_points_at_the_design_note_or_shared_files():
    pattern = re.compile(r"DESIGN(\.md| §| [0-9])|\.\./shared")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in SHIPPED
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, broken
