"""Leave-one-out split by time, and the synthetic data generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.data.readers import read_domain
from shared.data.split import split_domain
from shared.data.synthetic import DOMAINS, TOPICS, SyntheticConfig, domain_names, generate
from shared.data.tables import DomainData


def test_leave_one_out_by_time_with_file_order_tie_break() -> None:
    inter = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u2"],
            "item_id": ["a", "b", "c", "d", "a", "b"],
            "timestamp": [1, 2, 2, 3, 5, 6],  # b and c share a time: file order decides
        }
    )
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "text": ["A", "B", "C", "D"]})
    split = split_domain(DomainData("toy", inter, items, Path("."), "tsv"))
    assert split.train[0].tolist() == [1, 2] and (split.valid[0], split.test[0]) == (3, 4)
    assert split.train[1].tolist() == [1, 2] and split.valid[1] == 0  # 2 items: train only
    assert split.eval_users("test").tolist() == [0]
    assert split.history(0, "test").tolist() == [1, 2, 3]


def test_reader_sorts_by_time_keeping_file_order(tmp_path: Path) -> None:
    (tmp_path / "interactions.tsv").write_text("UserID\tItemID\tTimestamp\n1\t11\t50\n1\t10\t20\n1\t12\t50\n1\t13\t10\n")
    (tmp_path / "items.tsv").write_text("ItemID\tTitle\n10\tTen\n11\tEleven\n12\tTwelve\n13\tThirteen\n")
    data = read_domain(tmp_path)
    assert data.interactions["item_id"].tolist() == ["13", "10", "11", "12"]


def test_synthetic_is_deterministic_and_readable(tmp_path: Path) -> None:
    config = SyntheticConfig(domains=2, users=50, items=40, seed=3)
    first = generate(tmp_path / "a", config)
    second = generate(tmp_path / "b", config)
    for x, y in zip(first, second, strict=True):
        for name in ("interactions.tsv.gz", "items.tsv.gz"):
            assert (x / name).read_bytes() == (y / name).read_bytes()
        data = read_domain(x)
        assert data.stats()["users"] == 50 and data.stats()["items"] == 40
    other = generate(tmp_path / "c", SyntheticConfig(domains=2, users=50, items=40, seed=4))
    assert (other[0] / "interactions.tsv.gz").read_bytes() != (first[0] / "interactions.tsv.gz").read_bytes()


def test_synthetic_tastes_carry_across_domains(tmp_path: Path) -> None:
    """User number u likes the same topics in every domain: what federation can share."""
    folders = generate(tmp_path, SyntheticConfig(domains=2, users=200, items=80, seed=0))
    topic_of_word = {w: t for t, words in TOPICS.items() for w in words}
    favourite = []
    for folder in folders:
        data = read_domain(folder)
        text = dict(zip(data.items["item_id"], data.items["text"], strict=True))
        # the title's 2nd and 3rd words name the item's topic
        topic = data.interactions["item_id"].map({i: topic_of_word[t.split()[1].lower()] for i, t in text.items()})
        favourite.append(data.interactions.assign(topic=topic).groupby("user_id")["topic"].agg(lambda s: s.value_counts().index[0]))
    same_user = float((favourite[0].to_numpy() == favourite[1].to_numpy()).mean())
    other_user = float((favourite[0].to_numpy() == np.roll(favourite[1].to_numpy(), 1)).mean())
    assert same_user > 2 * other_user, (same_user, other_user)


def test_synthetic_makes_as_many_domains_as_asked(tmp_path: Path) -> None:
    """After the five kinds of catalogue the kinds repeat, each a catalogue of its own items (many simulated partners)."""
    folders = generate(tmp_path, SyntheticConfig(domains=12, users=30, items=20, seed=0))
    assert [f.name for f in folders] == [*domain_names(5), *(f"{k}-2" for k in domain_names(5)), "books-3", "games-3"]
    assert domain_names(3) == ["books", "games", "gear"]  # the first domains do not change with how many there are
    first = generate(tmp_path / "five", SyntheticConfig(domains=5, users=30, items=20, seed=0))
    assert all((a / "items.tsv.gz").read_bytes() == (b / "items.tsv.gz").read_bytes() for a, b in zip(first, folders[:5], strict=True))
    books, again = (read_domain(tmp_path / n).items for n in ("books", "books-2"))
    assert set(books["text"]).isdisjoint(again["text"])  # the same kind, another catalogue
    assert again["text"].str.split().str[-5].isin(DOMAINS["books"]).all()  # ... of books: "<noun> - <colour> <edition> Edition"
    assert all(read_domain(f).stats()["users"] == 30 for f in folders)


def test_synthetic_rejects_bad_config() -> None:
    with pytest.raises(ValueError) as info:
        SyntheticConfig(domains=0, stickiness=1.5)
    assert str(info.value) == (
        "invalid SyntheticConfig: domains must be a whole number of at least 1, got 0; stickiness must be a probability in [0, 1], got 1.5"
    )
