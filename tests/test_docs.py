"""The Markdown docs: every relative link points at a file that exists and, with ``#anchor``, at one of its
headings; every table renders as written; the settings reference is what the code's help strings say.

The docs link across files by section (README → docs/federation.md#report, ...); a renamed heading or a moved
section would otherwise leave a dead link that nothing notices. A table row that loses its closing ``|`` or a
paragraph written right under a table renders as a broken table, which reads fine in the source.
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


UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def table_problems(lines: tuple[str, ...]) -> list[tuple[int, str]]:
    """Where a Markdown table would not render as meant: (line number, what is wrong).

    GitHub's renderer counts a cell at every unescaped ``|`` (inside code spans too), and
    a table goes on until a blank line: a paragraph that follows a table directly is read
    as one more row.
    """
    problems: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        if not lines[index].lstrip().startswith("|"):  # a table in a list item is indented
            index += 1
            continue
        start = index
        while index < len(lines) and lines[index].lstrip().startswith("|"):
            index += 1
        header_cells = len(UNESCAPED_PIPE.findall(lines[start])) - 1
        for number in range(start, index):
            row = lines[number].rstrip()
            cells = len(UNESCAPED_PIPE.findall(row)) - 1
            if not row.endswith("|"):
                problems.append((number + 1, "the row does not end with '|'"))
            elif cells != header_cells:
                problems.append((number + 1, f"{cells} cells where the header has {header_cells} (write a '|' in a cell as '\\|')"))
        if start + 1 < index and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[start + 1].strip()):
            problems.append((start + 2, "the table's second line is not its |---| separator"))
        following = lines[index] if index < len(lines) else ""
        if following.strip() and not following.lstrip().startswith("<!--"):
            problems.append((index + 1, "no blank line after the table: this line would render as one more row"))
    return problems


def test_table_problems_are_found() -> None:
    whole = ("| a | b |", "|---|:-:|", "| `x \\| y` | 2 |", "", "  | in | a list |", "  |---|---|", "")
    assert table_problems(whole) == []
    broken = ("| a | b |", "|---|---|", "| 1 | 2 | 3 |", "| 1 | 2 | text that", "goes on")
    assert [number for number, _ in table_problems(broken)] == [3, 4, 5]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_render_as_written(doc: Path) -> None:
    found = [f"{doc.relative_to(ROOT)}:{number}: {why}" for number, why in table_problems(prose_lines(doc))]
    assert not found, "tables that would not render as written:\n" + "\n".join(found)
