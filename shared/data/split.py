"""Leave-one-out split by time, and the integer sequences the model trains on.

Each user's last interaction is the test target, the second-last the valid
target, the rest the training sequence (RecBole's ``LS`` protocol). A format that
brings its own split (recbole) keeps it. Users with fewer than three
interactions only train. Item index 0 is padding; catalogue items are 1..N in
the catalogue's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.tables import DomainData


@dataclass
class DomainSplit:
    """One domain as integer sequences. ``valid[u] == 0`` means user u is not evaluated."""

    name: str
    item_ids: list[str]  # item index i (1-based) is item_ids[i - 1]
    item_texts: list[str]
    users: list[str]
    train: list[np.ndarray]  # per user, item indices in time order
    valid: np.ndarray  # [U] valid target per user (0: none)
    test: np.ndarray  # [U] test target per user (0: none)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def history(self, user: int, which: str) -> np.ndarray:
        """What the model sees before the ``which`` ("valid"/"test") target."""
        if which == "valid":
            return self.train[user]
        return np.append(self.train[user], self.valid[user])

    def eval_users(self, which: str) -> np.ndarray:
        targets = self.valid if which == "valid" else self.test
        return np.flatnonzero(targets > 0)

    def new_item_targets(self, which: str) -> np.ndarray:
        """[len(eval_users(which))] bool: the user's ``which`` target is a new item, one that no training
        sequence holds (only its text says what it is: a model learns nothing else of it)."""
        targets = self.valid if which == "valid" else self.test
        return (self.item_popularity() == 0)[targets[self.eval_users(which)]]

    def select_users(self, users: slice) -> DomainSplit:
        """These users only (e.g. ``slice(300)``: the first 300); the catalogue is unchanged."""
        return DomainSplit(
            self.name, self.item_ids, self.item_texts, self.users[users], self.train[users], self.valid[users], self.test[users]
        )

    def item_popularity(self) -> np.ndarray:
        """[N + 1] training interaction counts per item index (index 0 unused)."""
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        for seq in self.train:
            np.add.at(counts, seq, 1)
        return counts


def split_domain(data: DomainData) -> DomainSplit:
    """Leave-one-out by time, or the format's own split when it has one."""
    items = data.items
    index = {item: i + 1 for i, item in enumerate(items["item_id"])}
    inter = data.interactions
    item_idx = inter["item_id"].map(index).to_numpy(dtype=np.int64, copy=True)  # writable: torch shares it
    users: list[str] = []
    train: list[np.ndarray] = []
    valid: list[int] = []
    test: list[int] = []
    # interactions are sorted by (user, time); split by user boundaries.
    user_col = inter["user_id"].to_numpy()
    bounds = np.flatnonzero(user_col[1:] != user_col[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(inter)]])
    split_col = inter["split"].to_numpy() if data.has_own_split else None
    for s, e in zip(starts, ends, strict=True):
        seq = item_idx[s:e]
        users.append(str(user_col[s]))
        if split_col is not None:
            parts = split_col[s:e]
            train.append(seq[parts == "train"])
            v, t = seq[parts == "valid"], seq[parts == "test"]
            valid.append(int(v[0]) if len(v) else 0)
            test.append(int(t[0]) if len(t) else 0)
        elif len(seq) >= 3:
            train.append(seq[:-2])
            valid.append(int(seq[-2]))
            test.append(int(seq[-1]))
        else:
            train.append(seq)
            valid.append(0)
            test.append(0)
    return DomainSplit(
        name=data.name,
        item_ids=items["item_id"].tolist(),
        item_texts=items["text"].tolist(),
        users=users,
        train=train,
        valid=np.asarray(valid, dtype=np.int64),
        test=np.asarray(test, dtype=np.int64),
    )
