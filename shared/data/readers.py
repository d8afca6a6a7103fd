"""Readers: a partner's files -> canonical tables (:mod:`shared.data.tables`).

Formats, detected from the folder's files (:func:`detect_format`):

``tsv``
    ``interactions.tsv[.gz]`` (``UserID  ItemID  Timestamp``) and
    ``items.tsv[.gz]`` (``ItemID  Title``). Equal timestamps keep file order.
``recbole``
    RecBole atomic files ``NAME.{train,valid,test}.inter``, ``NAME.text``,
    ``NAME.item2index``: a leave-one-out split made by the data's publisher,
    kept as given so results compare with published ones.
``json``
    ``NAME.inter.json`` (``{user: [item, ...]}`` in time order) and
    ``NAME.item.json`` (``{item: {title, description, brand, categories}}``).
``mapped``
    A partner's own CSV, TSV or Parquet files, described by a
    ``fedxrec-data.toml`` in the folder (see :class:`MappedFormat`).

Every reader collects all problems (file, line, field, what was expected) and
raises one :class:`~shared.data.problems.DataError`.
"""

from __future__ import annotations

import csv
import html
import io
import json
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.problems import DataError, Problem, Problems
from shared.data.tables import DomainData, check_tables
from shared.data.textfiles import Table, read_delimited, read_text, suggest

MAPPING_FILE = "fedxrec-data.toml"
FORMATS = ("tsv", "recbole", "json", "mapped")


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def detect_format(folder: Path) -> str:
    """Which reader handles ``folder``; raises DataError naming the files expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(_one(folder, "is not a folder; expected a folder of data files"))
    if (folder / MAPPING_FILE).is_file():
        return "mapped"
    if _first_existing(folder, ["interactions.tsv.gz", "interactions.tsv"]):
        return "tsv"
    if list(folder.glob("*.train.inter")):
        return "recbole"
    if list(folder.glob("*.inter.json")):
        return "json"
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise DataError(
        _one(
            folder,
            f"no known data files (found {found}); expected one of: interactions.tsv[.gz] + "
            "items.tsv[.gz] (tsv), NAME.train/valid/test.inter + NAME.text + NAME.item2index "
            f"(recbole), NAME.inter.json + NAME.item.json (json), or a {MAPPING_FILE} describing "
            "your own CSV/Parquet files (mapped)",
            kind="unknown format",
        )
    )


def read_domain(path: str | Path, *, name: str | None = None, format: str | None = None) -> DomainData:
    """Reads and validates one domain folder. The domain name defaults to the folder's name."""
    folder = Path(path)
    fmt = format or detect_format(folder)
    if fmt not in FORMATS:
        raise DataError(_one(folder, f"unknown format {fmt!r}; expected one of {FORMATS}", kind="unknown format"))
    if not folder.is_dir():
        raise DataError(_one(folder, "is not a folder; expected a folder of data files"))
    domain_name = name or folder.resolve().name
    problems = Problems()
    reader = {"tsv": _read_tsv, "recbole": _read_recbole, "json": _read_json, "mapped": _read_mapped}[fmt]
    data = reader(folder, domain_name, problems)
    problems.raise_if_any()
    assert data is not None
    return data


def _one(path: Path, message: str, *, kind: str = "invalid") -> list[Problem]:
    p = Problems()
    p.add(path, message, kind=kind)
    return list(p)


# --------------------------------------------------------------------------- helpers


def _ids(table: Table, column: str, problems: Problems) -> list[str]:
    values = [v.strip() for v in table.columns[column]]
    for v, line in zip(values, table.lines, strict=True):
        if not v:
            problems.add(table.path, "empty id", line=line, field=column, kind="unparsable value")
    return values


def _integers(values: list[str], lines: list[int], path: Path, column: str, problems: Problems) -> np.ndarray:
    parsed = pd.to_numeric(pd.Series(values, dtype="string"), errors="coerce")
    bad = parsed.isna() | (parsed != parsed.round())
    for i in np.flatnonzero(bad.to_numpy()):
        problems.add(
            path,
            f"{values[i]!r} is not an integer (expected Unix seconds)",
            line=lines[i],
            field=column,
            kind="unparsable value",
        )
    return parsed.fillna(0).to_numpy().astype(np.int64)


def _order_by_time(inter: pd.DataFrame) -> pd.DataFrame:
    # Stable sort: equal timestamps keep the file's order (the data's own tie-break).
    return inter.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- tsv


def _read_tsv(folder: Path, name: str, problems: Problems) -> DomainData | None:
    inter_path = _first_existing(folder, ["interactions.tsv.gz", "interactions.tsv"])
    items_path = _first_existing(folder, ["items.tsv.gz", "items.tsv"])
    if inter_path is None:
        problems.add(folder / "interactions.tsv.gz", "is missing", kind="missing file")
    if items_path is None:
        problems.add(folder / "items.tsv.gz", "is missing", kind="missing file")
    if inter_path is None or items_path is None:
        return None
    inter_t = read_delimited(inter_path, problems, required=["UserID", "ItemID", "Timestamp"])
    items_t = read_delimited(items_path, problems, required=["ItemID", "Title"])
    if inter_t is None or items_t is None:
        return None
    inter = pd.DataFrame(
        {
            "user_id": _ids(inter_t, "UserID", problems),
            "item_id": _ids(inter_t, "ItemID", problems),
            "timestamp": _integers(inter_t.columns["Timestamp"], inter_t.lines, inter_path, "Timestamp", problems),
            "line": inter_t.lines,
        }
    )
    items = pd.DataFrame(
        {
            "item_id": _ids(items_t, "ItemID", problems),
            "text": [t.strip() for t in items_t.columns["Title"]],
            "line": items_t.lines,
        }
    )
    check_tables(
        problems,
        interactions=inter,
        items=items,
        interactions_file=str(inter_path),
        items_file=str(items_path),
        item_column="ItemID",
        id_column="ItemID",
        text_column="Title",
    )
    if problems:
        return None
    return DomainData(name, _order_by_time(inter.drop(columns="line")), items.drop(columns="line"), folder, "tsv")


# --------------------------------------------------------------------------- recbole


def _read_recbole(folder: Path, name: str, problems: Problems) -> DomainData | None:
    stem = sorted(folder.glob("*.train.inter"))[0].name[: -len(".train.inter")]
    paths = {part: folder / f"{stem}.{part}" for part in ["train.inter", "valid.inter", "test.inter", "text", "item2index"]}
    for p in paths.values():
        if not p.is_file():
            problems.add(p, "is missing (the recbole format needs train/valid/test .inter, .text and .item2index)", kind="missing file")
    if problems:
        return None
    index_t = _read_headerless_map(paths["item2index"], problems)
    text_t = read_delimited(paths["text"], problems, required=["item_id", "text"], strip_type_suffix=True)
    parts = {
        part: read_delimited(paths[f"{part}.inter"], problems, required=["user_id", "item_id_list", "item_id"], strip_type_suffix=True)
        for part in ("train", "valid", "test")
    }
    if index_t is None or text_t is None or any(t is None for t in parts.values()):
        return None
    asin_of: dict[str, str] = {}
    for asin, idx, line in index_t:
        if idx in asin_of:
            problems.add(paths["item2index"], f"index {idx!r} is given twice", line=line, field="index", kind="duplicate item id")
        asin_of[idx] = asin
    items = pd.DataFrame(
        {
            "item_id": _ids(text_t, "item_id", problems),
            "text": [t.strip() for t in text_t.columns["text"]],
            "line": text_t.lines,
        }
    )
    with_text = set(items["item_id"])
    for asin, _, line in index_t:
        if asin not in with_text:
            problems.add(
                paths["item2index"], f"item {asin!r} has no text in {paths['text'].name}", line=line, field="item_id", kind="unknown item"
            )

    # One row per prefix in train, one per user in valid and test; rebuild each user's sequence.
    rows: dict[str, dict[str, list[tuple[list[str], str, int]]]] = defaultdict(lambda: defaultdict(list))
    for part, table in parts.items():
        assert table is not None
        for user, hist, target, line in zip(
            table.columns["user_id"], table.columns["item_id_list"], table.columns["item_id"], table.lines, strict=True
        ):
            tokens = hist.split()
            for tok in [*tokens, target]:
                if tok not in asin_of:
                    problems.add(
                        table.path,
                        f"item index {tok!r} is not in {paths['item2index'].name}",
                        line=line,
                        field="item_id",
                        kind="unknown item",
                    )
            rows[user.strip()][part].append((tokens, target.strip(), line))
    records: list[tuple[str, str, int, str, int, str]] = []
    for user, by_part in rows.items():
        for part in ("valid", "test"):
            if len(by_part[part]) != 1:
                path = paths[f"{part}.inter"]
                problems.add(
                    path, f"user {user!r} has {len(by_part[part])} rows; expected exactly 1", field="user_id", kind="inconsistent split"
                )
        if problems:
            continue
        (vh, vt, vline), (th, tt, tline) = by_part["valid"][0], by_part["test"][0]
        train = [[*h, t] for h, t, _ in by_part["train"]]
        base = max(train, key=len) if train else vh
        if base[-len(vh) :] != vh if vh else False:
            problems.add(
                paths["valid.inter"],
                f"user {user!r}: history does not continue the train sequence",
                line=vline,
                field="item_id_list",
                kind="inconsistent split",
            )
        if [*base, vt][-len(th) :] != th:
            problems.add(
                paths["test.inter"],
                f"user {user!r}: history is not train sequence + valid item",
                line=tline,
                field="item_id_list",
                kind="inconsistent split",
            )
        full = [*base, vt, tt]
        for pos, tok in enumerate(full):
            split = "train" if pos < len(base) else ("valid" if pos == len(base) else "test")
            records.append((user, asin_of.get(tok, tok), pos, split, tline, str(paths["test.inter"])))
    inter = pd.DataFrame(records, columns=["user_id", "item_id", "timestamp", "split", "line", "file"])
    check_tables(problems, interactions=inter, items=items, interactions_file=str(paths["test.inter"]), items_file=str(paths["text"]))
    if problems:
        return None
    items = items[items["item_id"].isin(set(asin_of.values()))]
    inter = inter.drop(columns=["line", "file"])
    return DomainData(name, _order_by_time(inter), items.drop(columns="line").reset_index(drop=True), folder, "recbole")


def _read_headerless_map(path: Path, problems: Problems) -> list[tuple[str, str, int]] | None:
    text = read_text(path, problems)
    if text is None:
        return None
    out = []
    for n, row in enumerate(text.split("\n"), start=1):
        if not row.strip():
            continue
        fields_ = row.rstrip("\r").split("\t")
        if len(fields_) != 2 or not fields_[0].strip() or not fields_[1].strip():
            problems.add(path, "expected 'ITEM_ID<TAB>INDEX'", line=n, kind="wrong number of fields")
            continue
        out.append((fields_[0].strip(), fields_[1].strip(), n))
    return out


# --------------------------------------------------------------------------- json

_JSON_TEXT_FIELDS = ("title", "brand", "categories", "description")


def _read_json_file(path: Path, problems: Problems) -> dict[str, object] | None:
    text = read_text(path, problems)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        problems.add(path, f"is not valid JSON: {err.msg} (column {err.colno})", line=err.lineno, kind="unparsable value")
        return None
    if not isinstance(obj, dict):
        problems.add(path, f"expected a JSON object at the top level, found {type(obj).__name__}", line=1, kind="unparsable value")
        return None
    return obj


def _read_json(folder: Path, name: str, problems: Problems) -> DomainData | None:
    inter_path = sorted(folder.glob("*.inter.json"))[0]
    stem = inter_path.name[: -len(".inter.json")]
    items_path = folder / f"{stem}.item.json"
    if not items_path.is_file():
        problems.add(items_path, f"is missing (needed beside {inter_path.name})", kind="missing file")
        return None
    seqs, meta = _read_json_file(inter_path, problems), _read_json_file(items_path, problems)
    if seqs is None or meta is None:
        return None
    # json keeps no line numbers: "line" is 0 and "key" names the key path instead.
    records = []
    for user, seq in seqs.items():
        if not isinstance(seq, list):
            problems.add(
                inter_path, f"expected a list of item ids, found {type(seq).__name__}", field=f"[{user!r}]", kind="unparsable value"
            )
            continue
        for pos, item in enumerate(seq):
            if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).strip():
                problems.add(inter_path, f"expected an item id, found {item!r}", field=f"[{user!r}][{pos}]", kind="unparsable value")
                continue
            records.append((str(user), str(item), pos, 0, f"[{user!r}][{pos}]"))
    item_rows = []
    for item, info in meta.items():
        if not isinstance(info, dict):
            problems.add(
                items_path,
                f"expected an object with {list(_JSON_TEXT_FIELDS)}, found {type(info).__name__}",
                field=f"[{item!r}]",
                kind="unparsable value",
            )
            continue
        parts = [html.unescape(str(info.get(k) or "")).strip() for k in _JSON_TEXT_FIELDS]
        item_rows.append((str(item), ". ".join(p for p in parts if p), 0, f"[{item!r}]"))
    inter = pd.DataFrame(records, columns=["user_id", "item_id", "timestamp", "line", "key"])
    items = pd.DataFrame(item_rows, columns=["item_id", "text", "line", "key"])
    check_tables(problems, interactions=inter, items=items, interactions_file=str(inter_path), items_file=str(items_path))
    if problems:
        return None
    return DomainData(name, _order_by_time(inter.drop(columns=["line", "key"])), items.drop(columns=["line", "key"]), folder, "json")


# --------------------------------------------------------------------------- mapped


@dataclass
class MappedFormat:
    """Contents of ``fedxrec-data.toml``: where a partner's own columns are.

    Example::

        name = "my-shop"                      # optional; default: the folder's name
        [interactions]
        file = "events.csv"                   # .csv, .tsv, .csv.gz, .tsv.gz or .parquet
        user = "customer_id"
        item = "sku"
        time = "ts"                           # optional: Unix seconds or ISO-8601; default file order
        [items]
        file = "catalogue.parquet"
        id = "sku"
        text = ["title", "brand", "description"]   # joined with ". "
    """

    interactions_file: str = field(metadata={"help": "[interactions] file"})
    user: str = field(metadata={"help": "[interactions] user: the user id column"})
    item: str = field(metadata={"help": "[interactions] item: the item id column"})
    items_file: str = field(metadata={"help": "[items] file"})
    item_id: str = field(metadata={"help": "[items] id: the item id column"})
    text: list[str] = field(metadata={"help": "[items] text: one column or a list, joined with '. '"})
    time: str | None = field(default=None, metadata={"help": "[interactions] time (optional)"})
    name: str | None = field(default=None, metadata={"help": "domain name (optional)"})

    @classmethod
    def load(cls, path: Path, problems: Problems) -> MappedFormat | None:
        text = read_text(path, problems)
        if text is None:
            return None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            problems.add(path, f"is not valid TOML: {err}", kind="unparsable value")
            return None
        allowed = {"": {"name", "interactions", "items"}, "interactions": {"file", "user", "item", "time"}, "items": {"file", "id", "text"}}
        required = {"interactions": ["file", "user", "item"], "items": ["file", "id", "text"]}
        for key in raw:
            if key not in allowed[""]:
                problems.add(path, f"unknown key {key!r}{suggest(key, sorted(allowed['']))}", field=key, kind="invalid config")
        for section, keys in required.items():
            table = raw.get(section)
            if not isinstance(table, dict):
                problems.add(path, f"missing table [{section}] with keys {keys}", field=section, kind="invalid config")
                continue
            for k in table:
                if k not in allowed[section]:
                    problems.add(
                        path, f"unknown key {k!r}{suggest(k, sorted(allowed[section]))}", field=f"{section}.{k}", kind="invalid config"
                    )
            for k in keys:
                if k not in table:
                    problems.add(path, f"missing key {k!r}", field=f"{section}.{k}", kind="invalid config")
        if problems:
            return None
        text_cols = raw["items"]["text"]
        text_cols = [text_cols] if isinstance(text_cols, str) else list(text_cols)
        return cls(
            interactions_file=raw["interactions"]["file"],
            user=raw["interactions"]["user"],
            item=raw["interactions"]["item"],
            time=raw["interactions"].get("time"),
            items_file=raw["items"]["file"],
            item_id=raw["items"]["id"],
            text=text_cols,
            name=raw.get("name"),
        )


def mapping_help() -> str:
    return "\n".join(f"  {f.name}: {f.metadata['help']}" for f in fields(MappedFormat))


def _read_any_table(path: Path, problems: Problems, *, required: list[str]) -> Table | None:
    if not path.is_file():
        problems.add(path, "is missing (named in the mapping file)", kind="missing file")
        return None
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises many types for a broken file
            problems.add(path, f"is not a readable Parquet file ({err})", kind="unreadable file")
            return None
        missing = [c for c in required if c not in frame.columns]
        for col in missing:
            problems.add(
                path,
                f"missing column {col!r} (columns: {list(frame.columns)}){suggest(col, list(map(str, frame.columns)))}",
                field=col,
                kind="missing column",
            )
        if missing:
            return None
        if frame.empty:
            problems.add(path, "has no rows", kind="empty file")
            return None
        values = {c: ["" if pd.isna(v) else str(v) for v in frame[c].tolist()] for c in required}
        return Table(path, values, list(range(1, len(frame) + 1)))
    name = path.name.removesuffix(".gz")
    sep = "\t" if name.endswith(".tsv") else ","
    if sep == "\t":
        return read_delimited(path, problems, required=required)
    text = read_text(path, problems)
    if text is None:
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lstrip("\ufeff") for h in next(reader)]
    missing = [c for c in required if c not in header]
    for col in missing:
        problems.add(path, f"missing column {col!r} (header has {header}){suggest(col, header)}", line=1, field=col, kind="missing column")
    if missing:
        return None
    cols: dict[str, list[str]] = {c: [] for c in required}
    lines = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            problems.add(path, f"has {len(row)} fields, the header has {len(header)}", line=reader.line_num, kind="wrong number of fields")
            continue
        for c in required:
            cols[c].append(row[header.index(c)])
        lines.append(reader.line_num)
    if not lines:
        problems.add(path, "has a header but no data rows", kind="empty file")
        return None
    return Table(path, cols, lines)


def _parse_times(table: Table, column: str, problems: Problems) -> np.ndarray:
    """Unix seconds or ISO-8601 date-times (both may occur in one column) -> seconds."""
    values = pd.Series(table.columns[column], dtype="string").str.strip()
    as_int = pd.to_numeric(values, errors="coerce")
    is_int = as_int.notna().to_numpy()
    seconds = np.zeros(len(values), dtype=np.int64)
    seconds[is_int] = as_int[is_int].to_numpy().astype(np.int64)
    if not is_int.all():
        rest = values[~is_int]
        as_dt = pd.to_datetime(rest, errors="coerce", utc=True, format="ISO8601")
        for i in np.flatnonzero(as_dt.isna().to_numpy()):
            problems.add(
                table.path,
                f"{rest.iloc[i]!r} is neither Unix seconds nor an ISO-8601 date-time",
                line=table.lines[rest.index[i]],
                field=column,
                kind="unparsable value",
            )
        parsed = ((as_dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).fillna(0)
        seconds[~is_int] = parsed.to_numpy().astype(np.int64)
    return seconds


def _read_mapped(folder: Path, name: str, problems: Problems) -> DomainData | None:
    mapping = MappedFormat.load(folder / MAPPING_FILE, problems)
    if mapping is None:
        return None
    inter_cols = [mapping.user, mapping.item] + ([mapping.time] if mapping.time else [])
    inter_t = _read_any_table(folder / mapping.interactions_file, problems, required=inter_cols)
    items_t = _read_any_table(folder / mapping.items_file, problems, required=[mapping.item_id, *mapping.text])
    if inter_t is None or items_t is None:
        return None
    inter = pd.DataFrame(
        {
            "user_id": _ids(inter_t, mapping.user, problems),
            "item_id": _ids(inter_t, mapping.item, problems),
            "timestamp": _parse_times(inter_t, mapping.time, problems) if mapping.time else np.arange(len(inter_t)),
            "line": inter_t.lines,
        }
    )
    texts = [". ".join(p.strip() for p in parts if p.strip()) for parts in zip(*(items_t.columns[c] for c in mapping.text), strict=True)]
    items = pd.DataFrame({"item_id": _ids(items_t, mapping.item_id, problems), "text": texts, "line": items_t.lines})
    check_tables(
        problems,
        interactions=inter,
        items=items,
        interactions_file=str(inter_t.path),
        items_file=str(items_t.path),
        item_column=mapping.item,
        id_column=mapping.item_id,
        text_column=" + ".join(mapping.text),
    )
    if problems:
        return None
    return DomainData(mapping.name or name, _order_by_time(inter.drop(columns="line")), items.drop(columns="line"), folder, "mapped")
