"""Canonical tables: what every reader produces, whatever the partner's format.

``interactions``: one row per (user, item, time) event, columns
    ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64, Unix seconds or,
    for formats without time, the position in the user's sequence), and
    ``split`` (``"train"``/``"valid"``/``"test"``) when the format brings its own
    split. Rows are in each user's time order, ties kept in file order.
``items``: one row per catalogue item, columns ``item_id`` (str), ``text`` (str).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from shared.data.problems import Problems

SPLITS = ("train", "valid", "test")


@dataclass
class DomainData:
    """One partner's domain in canonical form."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    source: Path
    format: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_own_split(self) -> bool:
        return "split" in self.interactions.columns

    def stats(self) -> dict[str, object]:
        inter = self.interactions
        texts = self.items["text"]
        used = set(inter["item_id"].unique())
        per_user = inter.groupby("user_id", sort=False).size()
        return {
            "domain": self.name,
            "format": self.format,
            "source": str(self.source),
            "users": int(inter["user_id"].nunique()),
            "items": len(self.items),
            "items_with_interactions": len(used),
            "interactions": len(inter),
            "text_coverage": float((texts.str.strip() != "").mean()) if len(texts) else 0.0,
            "distinct_texts": int(texts.nunique()),
            "mean_text_chars": float(texts.str.len().mean()) if len(texts) else 0.0,
            "history_length": {
                "min": int(per_user.min()) if len(per_user) else 0,
                "mean": float(per_user.mean()) if len(per_user) else 0.0,
                "max": int(per_user.max()) if len(per_user) else 0,
            },
            "own_split": self.has_own_split,
        }


def check_tables(
    problems: Problems,
    *,
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    interactions_file: str,
    items_file: str,
    item_column: str = "item_id",
    id_column: str = "item_id",
    text_column: str = "text",
) -> None:
    """Checks shared by every reader: duplicate item ids, empty text, unknown items.

    Both frames carry a ``line`` column (source line or row; 0 when the format has
    no lines, as JSON) used in the messages, and may carry a ``key`` column (a JSON
    key path) that then names the field; ``interactions`` may carry a ``file``
    column when it was read from several files. ``item_column``, ``id_column`` and
    ``text_column`` name the field as the partner's files call it (the interactions'
    item column, the catalogue's id and text columns). An empty item id is the
    reader's to report, so it is not reported again as an unknown item.
    """
    dup = items[items.duplicated("item_id", keep=False)]
    for item_id, group in dup.groupby("item_id", sort=False):
        lines = group["line"].tolist()
        problems.add(
            items_file,
            f"duplicate item id {item_id!r} (also on line(s) {', '.join(map(str, lines[:-1]))}); "
            "each item must appear once in the catalogue",
            line=int(lines[-1]) or None,
            field=_field(group.iloc[-1], id_column),
            kind="duplicate item id",
        )
    empty = items[items["text"].str.strip() == ""]
    for row in empty.itertuples(index=False):
        problems.add(
            items_file,
            f"item {row.item_id!r} has empty text; the encoder needs some text for every item (drop the item or give it a title)",
            line=int(row.line) or None,
            field=_field(row, text_column),
            kind="empty text",
        )
    known = set(items["item_id"])
    unknown = interactions[~interactions["item_id"].isin(known) & (interactions["item_id"] != "")]
    for row in unknown.itertuples(index=False):
        file = getattr(row, "file", interactions_file)
        problems.add(
            file,
            f"item {row.item_id!r} is not in the catalogue ({items_file})",
            line=int(row.line) or None,
            field=_field(row, item_column),
            kind="unknown item",
        )
    if len(interactions) == 0 and not problems:
        problems.add(interactions_file, "no interactions", kind="empty file")


def _field(row: object, default: str) -> str:
    key = getattr(row, "key", None)
    return f"{key}" if isinstance(key, str) and key else default
