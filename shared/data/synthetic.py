"""Synthetic multi-domain data with item text, written in the ``tsv`` format.

What carries across domains is what the federation should learn: people have
tastes over topics (space, cooking, ...); user number u of every domain is the
same person with the same taste (as when one population shops at several
partners), and an
item's title names its topics among words that say nothing about taste (brand,
colour, edition). A model must learn which words matter; a domain that has seen
many users teaches a small domain. User and item ids are per domain, as in real
partners' data: nobody is linked across domains.

Sequences: a user picks a topic from their taste, stays on it with probability
``stickiness``, and picks items within a topic by Zipf popularity.

Any number of domains: after the five kinds of catalogue (books, games, gear,
music-store, kids) the kinds repeat as new catalogues of their own items
(books-2, games-2, ...), so a simulation can have as many partners as it needs.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.checks import Problem, SelfChecking, expect

TOPICS: dict[str, list[str]] = {
    "space": ["galaxy", "rocket", "orbit", "astronaut", "nebula", "planet", "comet", "lunar"],
    "cooking": ["recipe", "kitchen", "spice", "baking", "pasta", "chef", "grill", "soup"],
    "ocean": ["reef", "sailing", "coral", "whale", "tide", "harbor", "diving", "island"],
    "music": ["guitar", "melody", "rhythm", "piano", "concert", "jazz", "drum", "chorus"],
    "garden": ["flower", "seed", "herb", "orchard", "tulip", "compost", "bloom", "greenhouse"],
    "history": ["empire", "castle", "medieval", "ancient", "dynasty", "knight", "pharaoh", "relic"],
    "fitness": ["running", "yoga", "muscle", "marathon", "cardio", "stretch", "sprint", "workout"],
    "mystery": ["detective", "clue", "secret", "shadow", "riddle", "puzzle", "cipher", "alibi"],
    "wildlife": ["tiger", "safari", "forest", "eagle", "wolf", "jungle", "panda", "falcon"],
    "robots": ["robot", "circuit", "android", "machine", "sensor", "laser", "gear", "cyborg"],
}
DOMAINS: dict[str, list[str]] = {
    "books": ["Novel", "Guide", "Handbook", "Anthology", "Paperback", "Storybook"],
    "games": ["Board Game", "Video Game", "Card Game", "Puzzle Box", "Quest Game", "Simulator"],
    "gear": ["Kit", "Poster", "Backpack", "Mug", "T-Shirt", "Lamp"],
    "music-store": ["Album", "Vinyl", "Songbook", "Playlist", "Box Set", "Single"],
    "kids": ["Toy", "Plush", "Sticker Set", "Coloring Book", "Building Blocks", "Costume"],
}
NOISE = {
    "brand": ["Zentro", "Alvora", "Qubix", "Nordel", "Pikora", "Veltan", "Marlo", "Sundra"],
    "colour": ["Blue", "Red", "Green", "Black", "Silver", "Orange", "White", "Purple"],
    "edition": ["Deluxe", "Classic", "Mini", "Pro", "Limited", "Junior", "XL", "Travel"],
}


@dataclass
class SyntheticConfig(SelfChecking):
    domains: int = field(
        default=3, metadata={"help": "number of domains; after the first five the kinds repeat with new items (books-2, ...)"}
    )
    users: int = field(default=400, metadata={"help": "users per domain"})
    items: int = field(default=150, metadata={"help": "items per domain"})
    mean_length: float = field(default=10.0, metadata={"help": "mean interactions per user (at least 5)"})
    stickiness: float = field(default=0.7, metadata={"help": "probability of staying on the current topic"})
    taste_concentration: float = field(default=0.3, metadata={"help": "Dirichlet alpha of tastes; small = focused"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same files"})

    def problems(self) -> list[Problem]:
        return expect(
            self,
            ("domains", self.domains >= 1, "a whole number of at least 1"),
            ("users", self.users >= 1, "a whole number of at least 1"),
            ("items", self.items >= len(TOPICS), f"at least {len(TOPICS)} (one item per topic)"),
            ("mean_length", self.mean_length >= 5, "at least 5 (a user needs train, valid and test items)"),
            ("stickiness", 0 <= self.stickiness <= 1, "a probability in [0, 1]"),
            ("taste_concentration", self.taste_concentration > 0, "above 0 (a Dirichlet alpha)"),
            ("seed", self.seed >= 0, "at least 0"),
        )


def generate(out: Path, config: SyntheticConfig | None = None) -> list[Path]:
    """Writes one ``tsv``-format folder per domain under ``out``; returns the folders."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    topics = list(TOPICS)
    tastes = user_tastes(cfg)
    folders = []
    for name, kind in _domains(cfg.domains):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        titles, item_topic = _items(rng, DOMAINS[kind], cfg.items, topics)
        rows = _interactions(rng, cfg, item_topic, tastes)
        _write_tsv(folder / "items.tsv.gz", ["ItemID", "Title"], [(100 + i, t) for i, t in enumerate(titles)])
        _write_tsv(folder / "interactions.tsv.gz", ["UserID", "ItemID", "Timestamp"], rows)
        folders.append(folder)
    return folders


def domain_names(n: int) -> list[str]:
    """The first ``n`` domains' names: the five kinds, then each kind again as ``<kind>-2``, ``-3``, ..."""
    return [name for name, _ in _domains(n)]


def _domains(n: int) -> list[tuple[str, str]]:
    """(name, kind of catalogue) of the first ``n`` domains."""
    kinds = list(DOMAINS)
    return [(kinds[i % len(kinds)] + (f"-{i // len(kinds) + 1}" if i >= len(kinds) else ""), kinds[i % len(kinds)]) for i in range(n)]


def user_tastes(config: SyntheticConfig) -> np.ndarray:
    """[users, topics] taste distributions, the same in every domain."""
    rng = np.random.default_rng([config.seed, 1])
    return rng.dirichlet(np.full(len(TOPICS), config.taste_concentration), size=config.users)


def _items(rng: np.random.Generator, nouns: list[str], n: int, topics: list[str]) -> tuple[list[str], np.ndarray]:
    titles, item_topic = [], np.arange(n) % len(topics)
    rng.shuffle(item_topic)
    for t in item_topic:
        words = rng.choice(TOPICS[topics[t]], size=2, replace=False)
        parts = [rng.choice(NOISE["brand"]), *(w.capitalize() for w in words), rng.choice(nouns)]
        if rng.random() < 0.3:  # a second, weaker topic word
            other = topics[rng.integers(len(topics))]
            parts.insert(3, rng.choice(TOPICS[other]).capitalize())
        parts.append(f"- {rng.choice(NOISE['colour'])} {rng.choice(NOISE['edition'])} Edition")
        titles.append(" ".join(parts))
    return titles, item_topic


def _interactions(rng: np.random.Generator, cfg: SyntheticConfig, item_topic: np.ndarray, tastes: np.ndarray) -> list[tuple[int, int, int]]:
    n_topics = tastes.shape[1]
    by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    zipf = [1.0 / np.arange(1, len(ix) + 1) ** 0.8 for ix in by_topic]
    zipf = [z / z.sum() for z in zipf]
    rows = []
    for u in range(cfg.users):
        taste = tastes[u]
        length = 5 + rng.geometric(1.0 / (cfg.mean_length - 4)) - 1
        length = int(min(length, 60))
        t = int(rng.choice(n_topics, p=taste))
        time = 1_500_000_000 + int(rng.integers(0, 10_000_000))
        seen: set[int] = set()
        for _ in range(length):
            if rng.random() > cfg.stickiness:
                t = int(rng.choice(n_topics, p=taste))
            item = int(rng.choice(by_topic[t], p=zipf[t]))
            if item in seen:  # people rarely buy the same thing twice; try once more
                item = int(rng.choice(by_topic[t], p=zipf[t]))
            seen.add(item)
            time += int(rng.integers(60, 86_400 * 7))
            rows.append((1000 + u, 100 + item, time))
    return rows


def _write_tsv(path: Path, header: list[str], rows: Sequence[tuple[object, ...]]) -> None:
    body = "\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows)
    # mtime=0: same seed, byte-identical files (gzip stores a timestamp otherwise).
    path.write_bytes(gzip.compress(body.encode("utf-8"), mtime=0))
