"""Readers on the real files in ../shared/data and on broken copies of them.

Every broken copy must give one DataError that lists each problem with its file,
line and field, never a traceback from deep inside pandas or json.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from shared.data.problems import DataError, Problem
from shared.data.readers import detect_format, read_domain
from shared.data.split import split_domain

# Counts published in ../shared/data/README.md.
REAL = {
    "amazon2014-beauty": ("tsv", 22_332, 12_086, 198_215),
    "amazon2014-toy": ("tsv", 19_124, 11_758, 165_247),
    "amazon2014-health": ("tsv", 38_329, 18_427, 343_831),
    "amazon2014-clothing": ("tsv", 39_230, 22_948, 277_534),
    "steam": ("tsv", 10_369, 3_593, 126_824),
    "amazon2018-scientific": ("recbole", 8_442, 4_385, None),  # interactions rebuilt from prefixes
    "amazon2014-office": ("json", 4_905, 2_420, 53_258),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_folder_reads_with_published_counts(real_data: Path, name: str) -> None:
    fmt, users, items, interactions = REAL[name]
    assert detect_format(real_data / name) == fmt
    data = read_domain(real_data / name)
    stats = data.stats()
    assert data.name == name and data.format == fmt
    assert (stats["users"], stats["items"]) == (users, items)
    if interactions is not None:
        assert stats["interactions"] == interactions
    assert stats["text_coverage"] == 1.0
    split = split_domain(data)
    assert len(split.eval_users("test")) == users  # every user has >= 3 interactions here


def test_recbole_split_is_kept_as_given(real_data: Path) -> None:
    folder = real_data / "amazon2018-scientific"
    split = split_domain(read_domain(folder))
    index_of = {asin: i for i, asin in enumerate(split.item_ids, start=1)}
    asin_of = dict(line.split("\t")[::-1] for line in (folder / "Scientific.item2index").read_text().split("\n") if line)
    user_index = {u: i for i, u in enumerate(split.users)}
    rows = (folder / "Scientific.test.inter").read_text().split("\n")[1:]
    for row in rows[:200]:
        if not row:
            continue
        user, history, target = row.split("\t")
        u = user_index[user]
        assert split.test[u] == index_of[asin_of[target]]
        expected = [index_of[asin_of[t]] for t in history.split()]
        assert split.history(u, "test")[-len(expected) :].tolist() == expected


# --------------------------------------------------------------------------- helpers


def problems_of(folder: Path) -> list[Problem]:
    with pytest.raises(DataError) as info:
        read_domain(folder)
    return info.value.problems


def find(problems: list[Problem], kind: str) -> Problem:
    matches = [p for p in problems if p.kind == kind]
    assert matches, f"no {kind!r} problem in {[str(p) for p in problems]}"
    return matches[0]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def steam_copy(real_data: Path, tmp_path: Path) -> Path:
    """A small plain-text copy of the steam folder: 300 interactions, all items."""
    folder = tmp_path / "steam-copy"
    folder.mkdir()
    with gzip.open(real_data / "steam" / "interactions.tsv.gz", "rt", encoding="utf-8") as fh:
        inter = [next(fh).rstrip("\n") for _ in range(301)]
    with gzip.open(real_data / "steam" / "items.tsv.gz", "rt", encoding="utf-8") as fh:
        items = fh.read().rstrip("\n").split("\n")
    write_lines(folder / "interactions.tsv", inter)
    write_lines(folder / "items.tsv", items)
    return folder


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


# --------------------------------------------------------------------------- tsv


def test_tsv_copy_reads(steam_copy: Path) -> None:
    assert read_domain(steam_copy).stats()["interactions"] == 300


def test_tsv_renamed_column(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "interactions.tsv")
    write_lines(steam_copy / "interactions.tsv", ["UserID\tItemId\tTimestamp", *lines[1:]])
    p = find(problems_of(steam_copy), "missing column")
    assert (Path(p.file).name, p.line, p.field) == ("interactions.tsv", 1, "ItemID")
    assert "did you mean 'ItemId'" in p.message


def test_tsv_unparsable_timestamp(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "interactions.tsv")
    user, item, _ = lines[4].split("\t")
    lines[4] = f"{user}\t{item}\tyesterday"
    write_lines(steam_copy / "interactions.tsv", lines)
    p = find(problems_of(steam_copy), "unparsable value")
    assert (Path(p.file).name, p.line, p.field) == ("interactions.tsv", 5, "Timestamp")
    assert "'yesterday' is not an integer" in p.message


def test_tsv_duplicate_item_id(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "items.tsv")
    first_id = lines[1].split("\t")[0]
    write_lines(steam_copy / "items.tsv", [*lines, f"{first_id}\tAnother title"])
    p = find(problems_of(steam_copy), "duplicate item id")
    assert (Path(p.file).name, p.line, p.field) == ("items.tsv", len(lines) + 1, "ItemID")
    assert f"duplicate item id '{first_id}' (also on line(s) 2)" in p.message


def test_tsv_unknown_item(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "interactions.tsv")
    user, _, ts = lines[6].split("\t")
    lines[6] = f"{user}\t999999999\t{ts}"
    write_lines(steam_copy / "interactions.tsv", lines)
    p = find(problems_of(steam_copy), "unknown item")
    assert (Path(p.file).name, p.line, p.field) == ("interactions.tsv", 7, "ItemID")
    assert "'999999999' is not in the catalogue" in p.message


def test_tsv_problems_come_once_each_in_line_order(steam_copy: Path) -> None:
    """An empty item id is one problem (not also an unknown item); the checks' passes are merged in line order."""
    lines = lines_of(steam_copy / "interactions.tsv")
    user, item, _ = lines[3].split("\t")
    lines[3] = f"{user}\t{item}\tlast week"
    user, _, ts = lines[2].split("\t")
    lines[2] = f"{user}\t \t{ts}"
    lines[5] = "\t".join([lines[5].split("\t")[0], "999999999", lines[5].split("\t")[2]])
    write_lines(steam_copy / "interactions.tsv", lines)
    problems = problems_of(steam_copy)
    assert [(Path(p.file).name, p.line, p.field, p.kind) for p in problems] == [
        ("interactions.tsv", 3, "ItemID", "unparsable value"),
        ("interactions.tsv", 4, "Timestamp", "unparsable value"),
        ("interactions.tsv", 6, "ItemID", "unknown item"),
    ]


def test_tsv_empty_text(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "items.tsv")
    item = lines[3].split("\t")[0]
    lines[3] = f"{item}\t   "
    write_lines(steam_copy / "items.tsv", lines)
    p = find(problems_of(steam_copy), "empty text")
    assert (Path(p.file).name, p.line, p.field) == ("items.tsv", 4, "Title")
    assert f"item '{item}' has empty text" in p.message


def test_tsv_empty_file(steam_copy: Path) -> None:
    (steam_copy / "items.tsv").write_bytes(b"")
    p = find(problems_of(steam_copy), "empty file")
    assert Path(p.file).name == "items.tsv" and "is empty" in p.message


def test_tsv_not_utf8(steam_copy: Path) -> None:
    raw = (steam_copy / "items.tsv").read_bytes().split(b"\n")
    raw[9] = raw[9].split(b"\t")[0] + b"\tCaf\xe9 Tycoon"  # Latin-1 é
    (steam_copy / "items.tsv").write_bytes(b"\n".join(raw))
    p = find(problems_of(steam_copy), "not UTF-8")
    assert (Path(p.file).name, p.line) == ("items.tsv", 10)
    assert "byte 0xe9" in p.message and "re-save the file as UTF-8" in p.message


def test_tsv_broken_gzip(steam_copy: Path) -> None:
    (steam_copy / "items.tsv").unlink()
    (steam_copy / "items.tsv.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    p = find(problems_of(steam_copy), "unreadable file")
    assert "is not a valid gzip file" in p.message


def test_tsv_missing_file(steam_copy: Path) -> None:
    (steam_copy / "items.tsv").unlink()
    p = find(problems_of(steam_copy), "missing file")
    assert Path(p.file).name == "items.tsv.gz" and "is missing" in p.message


def test_every_problem_is_reported_at_once(steam_copy: Path) -> None:
    inter = lines_of(steam_copy / "interactions.tsv")
    for i in (3, 8, 12):
        user, item, _ = inter[i].split("\t")
        inter[i] = f"{user}\t{item}\tnot-a-time"
    inter[20] = inter[20].split("\t")[0] + "\t123456789\t1"
    write_lines(steam_copy / "interactions.tsv", inter)
    items = lines_of(steam_copy / "items.tsv")
    items[5] = items[5].split("\t")[0] + "\t"
    write_lines(steam_copy / "items.tsv", items)
    problems = problems_of(steam_copy)
    kinds = sorted(p.kind for p in problems)
    assert kinds == ["empty text", "unknown item", "unparsable value", "unparsable value", "unparsable value"]
    assert sorted(p.line for p in problems if p.kind == "unparsable value") == [4, 9, 13]  # type: ignore[type-var]


def test_wrong_number_of_fields(steam_copy: Path) -> None:
    lines = lines_of(steam_copy / "interactions.tsv")
    lines[2] = lines[2] + "\textra"
    write_lines(steam_copy / "interactions.tsv", lines)
    p = find(problems_of(steam_copy), "wrong number of fields")
    assert p.line == 3 and "has 4 fields, the header has 3" in p.message


def test_unknown_folder_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    p = find(problems_of(tmp_path), "unknown format")
    assert "notes.txt" in p.message and "fedxrec-data.toml" in p.message


# --------------------------------------------------------------------------- recbole


@pytest.fixture
def scientific_copy(real_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "scientific-copy"
    shutil.copytree(real_data / "amazon2018-scientific", folder)
    return folder


def test_recbole_unknown_item_index(scientific_copy: Path) -> None:
    path = scientific_copy / "Scientific.test.inter"
    lines = lines_of(path)
    user, history, _ = lines[3].split("\t")
    lines[3] = f"{user}\t{history}\t99999"
    write_lines(path, lines)
    p = find(problems_of(scientific_copy), "unknown item")
    assert (Path(p.file).name, p.line, p.field) == ("Scientific.test.inter", 4, "item_id")
    assert "'99999' is not in Scientific.item2index" in p.message


def test_recbole_renamed_text_column(scientific_copy: Path) -> None:
    path = scientific_copy / "Scientific.text"
    lines = lines_of(path)
    write_lines(path, ["item_id:token\ttitle:token_seq", *lines[1:]])
    p = find(problems_of(scientific_copy), "missing column")
    assert (Path(p.file).name, p.line, p.field) == ("Scientific.text", 1, "text")


def test_recbole_duplicate_index(scientific_copy: Path) -> None:
    path = scientific_copy / "Scientific.item2index"
    lines = lines_of(path)
    write_lines(path, [*lines, "B0NEWITEM0\t5"])
    p = find(problems_of(scientific_copy), "duplicate item id")
    assert (Path(p.file).name, p.line, p.field) == ("Scientific.item2index", len(lines) + 1, "index")


def test_recbole_missing_part(scientific_copy: Path) -> None:
    (scientific_copy / "Scientific.valid.inter").unlink()
    p = find(problems_of(scientific_copy), "missing file")
    assert Path(p.file).name == "Scientific.valid.inter"


def test_recbole_inconsistent_split(scientific_copy: Path) -> None:
    path = scientific_copy / "Scientific.test.inter"
    lines = lines_of(path)
    write_lines(path, [*lines, lines[1]])  # user 0 twice in test
    p = find(problems_of(scientific_copy), "inconsistent split")
    assert "has 2 rows; expected exactly 1" in p.message


def test_recbole_not_utf8(scientific_copy: Path) -> None:
    path = scientific_copy / "Scientific.text"
    path.write_bytes(path.read_bytes().replace(b"Sanding", b"S\xff", 1))
    p = find(problems_of(scientific_copy), "not UTF-8")
    assert (Path(p.file).name, p.line) == ("Scientific.text", 2)


# --------------------------------------------------------------------------- json


@pytest.fixture
def office_copy(real_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "office-copy"
    shutil.copytree(real_data / "amazon2014-office", folder)
    return folder


def test_json_invalid_syntax(office_copy: Path) -> None:
    path = office_copy / "Office.inter.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    p = find(problems_of(office_copy), "unparsable value")
    assert Path(p.file).name == "Office.inter.json" and "is not valid JSON" in p.message and p.line


def test_json_unknown_item_and_empty_text(office_copy: Path) -> None:
    inter = json.loads((office_copy / "Office.inter.json").read_text())
    inter["0"][1] = 99999
    (office_copy / "Office.inter.json").write_text(json.dumps(inter))
    items = json.loads((office_copy / "Office.item.json").read_text())
    items["3"] = {"title": "", "description": "", "brand": "", "categories": ""}
    (office_copy / "Office.item.json").write_text(json.dumps(items))
    problems = problems_of(office_copy)
    unknown, empty = find(problems, "unknown item"), find(problems, "empty text")
    assert (Path(unknown.file).name, unknown.field) == ("Office.inter.json", "['0'][1]")
    assert (Path(empty.file).name, empty.field) == ("Office.item.json", "['3']")


def test_json_wrong_shape(office_copy: Path) -> None:
    inter = json.loads((office_copy / "Office.inter.json").read_text())
    inter["7"] = "12 13 14"
    (office_copy / "Office.inter.json").write_text(json.dumps(inter))
    p = find(problems_of(office_copy), "unparsable value")
    assert p.field == "['7']" and "expected a list of item ids, found str" in p.message
    inter["7"] = ["12", " "]
    (office_copy / "Office.inter.json").write_text(json.dumps(inter))
    problems = problems_of(office_copy)
    assert [(p.field, p.message) for p in problems] == [("['7'][1]", "expected an item id, found ' '")]


# --------------------------------------------------------------------------- mapped (a partner's own files)


def write_mapping(folder: Path, body: str) -> None:
    (folder / "fedxrec-data.toml").write_text(body, encoding="utf-8")


MAPPING = """
name = "my-shop"
[interactions]
file = "events.csv"
user = "customer"
item = "sku"
time = "when"
[items]
file = "catalogue.parquet"
id = "sku"
text = ["title", "brand"]
"""


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    folder.mkdir()
    events = pd.DataFrame(
        {
            "customer": ["ann", "ann", "ann", "bob", "bob", "bob", "bob"],
            "sku": ["a1", "b2", "c3", "c3", "a1", "d4", "b2"],
            "when": ["2024-01-03T10:00:00Z", "2024-01-01T10:00:00Z", "2024-01-02", "1704067200", "1704153600", "1704240000", "1704326400"],
        }
    )
    events.to_csv(folder / "events.csv", index=False)
    catalogue = pd.DataFrame(
        {
            "sku": ["a1", "b2", "c3", "d4"],
            "title": ["Red mug", "Blue lamp", "Green shirt", "Black poster"],
            "brand": ["Zentro", "", "Qubix", "Nordel"],
        }
    )
    catalogue.to_parquet(folder / "catalogue.parquet")
    write_mapping(folder, MAPPING)
    return folder


def test_mapped_csv_and_parquet(shop: Path) -> None:
    data = read_domain(shop)
    assert data.name == "my-shop" and data.format == "mapped"
    ann = data.interactions[data.interactions["user_id"] == "ann"]["item_id"].tolist()
    assert ann == ["b2", "c3", "a1"]  # ordered by the ISO times, not the file
    assert dict(zip(data.items["item_id"], data.items["text"], strict=True))["b2"] == "Blue lamp"
    assert dict(zip(data.items["item_id"], data.items["text"], strict=True))["a1"] == "Red mug. Zentro"


def test_mapped_config_typos_are_all_named(shop: Path) -> None:
    write_mapping(shop, MAPPING.replace('user = "customer"', 'usr = "customer"').replace("[items]", "[item]"))
    problems = problems_of(shop)
    messages = [str(p) for p in problems]
    assert any("unknown key 'usr'; did you mean 'user'?" in m for m in messages)
    assert any("missing key 'user'" in m for m in messages)
    assert any("unknown key 'item'; did you mean 'items'?" in m for m in messages)
    assert any("missing table [items]" in m for m in messages)


def test_mapped_problems_name_the_partners_own_columns(shop: Path) -> None:
    events = pd.read_csv(shop / "events.csv", dtype=str)
    events.loc[1, "sku"] = "z9"
    events.to_csv(shop / "events.csv", index=False)
    catalogue = pd.read_parquet(shop / "catalogue.parquet")
    catalogue.loc[3, ["title", "brand"]] = ["", " "]
    catalogue.loc[4] = ["a1", "Another mug", ""]
    catalogue.to_parquet(shop / "catalogue.parquet")
    problems = problems_of(shop)  # a Parquet file's "line" is its 1-based row; a CSV file's header is line 1
    assert [(Path(p.file).name, p.line, p.field, p.kind) for p in problems] == [
        ("catalogue.parquet", 4, "title + brand", "empty text"),
        ("catalogue.parquet", 5, "sku", "duplicate item id"),
        ("events.csv", 3, "sku", "unknown item"),
    ]


def test_mapped_missing_column_and_bad_time(shop: Path) -> None:
    events = pd.read_csv(shop / "events.csv", dtype=str)
    events.loc[2, "when"] = "last tuesday"
    events.to_csv(shop / "events.csv", index=False)
    catalogue = pd.read_parquet(shop / "catalogue.parquet").rename(columns={"title": "Title"})
    catalogue.to_parquet(shop / "catalogue.parquet")
    problems = problems_of(shop)
    col = find(problems, "missing column")
    assert (Path(col.file).name, col.field) == ("catalogue.parquet", "title")
    assert "did you mean 'Title'?" in col.message
    write_mapping(shop, MAPPING.replace('"title"', '"Title"'))
    bad = find(problems_of(shop), "unparsable value")
    assert (Path(bad.file).name, bad.line, bad.field) == ("events.csv", 4, "when")
