"""Low-level reading of delimited text files, recording every problem with its line."""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

from shared.data.problems import Problems


def read_text(path: Path, problems: Problems) -> str | None:
    """The file decoded as UTF-8 (gzip-decompressed if it ends in .gz), or None."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        problems.add(path, f"cannot be read: {err.strerror}", kind="unreadable file")
        return None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            problems.add(path, f"is not a valid gzip file ({err})", kind="unreadable file")
            return None
    if not raw.strip():
        problems.add(path, "is empty; expected a header line and data", kind="empty file")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        problems.add(
            path,
            f"is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save the file as UTF-8",
            line=line,
            kind="not UTF-8",
        )
        return None


@dataclass
class Table:
    """Columns of a delimited file as lists of strings, with 1-based source lines."""

    path: Path
    columns: dict[str, list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.lines)


def suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if not close:
        close = [c for c in candidates if c.lower() == name.lower()]
    return f"; did you mean {close[0]!r}?" if close else ""


def read_delimited(
    path: Path,
    problems: Problems,
    *,
    required: list[str],
    optional: list[str] = (),  # type: ignore[assignment]
    sep: str = "\t",
    strip_type_suffix: bool = False,
) -> Table | None:
    """Reads a header + rows file. Quotes are data, not syntax (titles contain them).

    ``strip_type_suffix`` drops RecBole's ``:token`` style suffixes from header names.
    Returns None when the file cannot be used at all (problems say why).
    """
    text = read_text(path, problems)
    if text is None:
        return None
    # csv semantics: a value that starts with a quote may hold tabs and newlines
    # ("a ""b"" c"); a quote elsewhere is an ordinary character (12" ruler).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quotechar='"', strict=False)
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader)]
    except StopIteration:
        problems.add(path, "is empty; expected a header line and data", kind="empty file")
        return None
    if strip_type_suffix:
        header = [h.split(":", 1)[0] for h in header]
    missing = [c for c in required if c not in header]
    for col in missing:
        problems.add(
            path,
            f"missing column {col!r} (header has {header}){suggest(col, header)}",
            line=1,
            field=col,
            kind="missing column",
        )
    if missing:
        return None
    wanted = [c for c in [*required, *optional] if c in header]
    index = {c: header.index(c) for c in wanted}
    width = len(header)
    columns: dict[str, list[str]] = {c: [] for c in wanted}
    lines: list[int] = []
    start = reader.line_num + 1
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                if len(fields) != width:
                    problems.add(
                        path,
                        f"has {len(fields)} fields, the header has {width} "
                        f"(separator {sep!r} inside an unquoted value, or a missing value?)",
                        line=start,
                        kind="wrong number of fields",
                    )
                else:
                    for c, i in index.items():
                        columns[c].append(fields[i])
                    lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        problems.add(path, f"cannot be parsed: {err}", line=start, kind="unparsable value")
        return None
    if not lines and not problems:
        problems.add(path, "has a header but no data rows", kind="empty file")
        return None
    return Table(path, columns, lines)
