"""Links between the project's Markdown files point at files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+?\.md)?(#[^)\s]+)?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors (lower case, punctuation but ``_`` and ``-`` dropped, spaces to hyphens) — with and
    without non-ASCII characters such as ², whose treatment differs between renderers — and
    explicit ``<a id="...">`` anchors."""
    found = set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    for heading in HEADING.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        words = re.sub(r"[`*]", "", heading).lower()  # code and emphasis marks
        slug = re.sub(r"[^\w\- ]", "", words).replace(" ", "-")
        found |= {slug, slug.encode("ascii", "ignore").decode()}
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_to_markdown_files_and_their_headings_resolve(doc):
    text = doc.read_text()
    broken = []
    for target, anchor in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path = (doc.parent / target).resolve() if target else doc
        if not path.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and anchor[1:] not in anchors(path.read_text()):
            broken.append(f"{target}{anchor}: no such heading in {path.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)
