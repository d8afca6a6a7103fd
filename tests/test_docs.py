"""Every relative link in the Markdown docs points at a file that exists and, with ``#anchor``, at one of its headings.

The docs link across files by section (README → docs/federation.md#report, ...); a renamed heading or a moved
section would otherwise leave a dead link that nothing notices.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`(?:[^`\n]|\n(?!\s*\n))*`")  # may wrap, not across a blank line
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]*)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation and symbols dropped, spaces as hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    kept = (c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


@functools.cache
def prose_lines(path: Path) -> tuple[str, ...]:
    """The file's lines with those of fenced code blocks blanked, so that line numbers stay as they are."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            line = ""
        lines.append("" if fenced else line)
    return tuple(lines)


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """The heading anchors of a Markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen.setdefault(f"{slug}-{count}", 1)
    return frozenset(seen)


def test_github_slug_matches_githubs_anchors() -> None:
    assert github_slug("Choices, and why") == "choices-and-why"
    assert github_slug("After the federation: a local fine-tune") == "after-the-federation-a-local-fine-tune"
    assert github_slug("Beside the averaged adapter (`calibrate-prior`)") == "beside-the-averaged-adapter-calibrate-prior"
    assert github_slug("(a) Scientific, `local`, vs published results") == "a-scientific-local-vs-published-results"
    assert github_slug("DP at ε = 8") == "dp-at-ε--8"


def prose(path: Path) -> str:
    """The file's text outside fenced code blocks, code spans removed (their line breaks kept)."""
    return CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), "\n".join(prose_lines(path)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    text = prose(doc)
    for match in LINK.finditer(text):  # link text may wrap onto the next line
        target = match.group(1)
        where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, match.start(1)) + 1}: ({target})"
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no internet)
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not target:
            broken.append(f"{where} empty link target")
        elif not linked.exists():
            broken.append(f"{where} no file {file_part}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{where} no heading with anchor #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, "dead links:\n" + "\n".join(broken)


def test_the_settings_reference_in_the_docs_is_what_fedxrec_settings_prints() -> None:
    from shared.federation import reference

    page = ROOT / "docs" / "federation.md"
    text = page.read_text(encoding="utf-8")
    assert reference.with_tables(text, where=str(page)) == text, (
        "docs/federation.md's settings tables differ from the code's help strings: run `make docs` to write them"
    )
