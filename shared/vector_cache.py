"""On-disk cache of item vectors, keyed by encoder fingerprint and text hash.

Layout: ``ROOT/<fingerprint[:16]>/shard-<uuid>.npz``, each shard holding
``keys`` ([n] sha256 hex digests of the texts) and ``vectors`` ([n, d] float32).
Shards are only ever added, each written to a temporary name and renamed, so
concurrent runs (several simulated partners) never see half a file and never
overwrite each other. The encoder thus runs at most once per distinct text per
encoder, across runs.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.encoder import TextEncoder


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDXREC_CACHE", Path.home() / ".cache" / "fedxrec")) / "vectors"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    texts: int = 0  # texts asked for
    distinct: int = 0  # distinct texts among them
    hits: int = 0  # distinct texts found in the cache
    encoded: int = 0  # distinct texts sent through the encoder

    @property
    def hit_rate(self) -> float:
        return self.hits / self.distinct if self.distinct else 1.0


class VectorCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def _folder(self, fingerprint: str) -> Path:
        return self.root / fingerprint[:16]

    def load(self, fingerprint: str) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        folder = self._folder(fingerprint)
        for shard in sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []:
            with np.load(shard) as z:
                for k, v in zip(z["keys"].tolist(), z["vectors"], strict=True):
                    found[k] = v
        return found

    def save(self, fingerprint: str, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        folder = self._folder(fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.npz"
        tmp = folder / f".{name}.tmp"
        with tmp.open("wb") as fh:
            np.savez(fh, keys=np.asarray(keys), vectors=vectors.astype(np.float32))
        tmp.rename(folder / name)


def encode_texts(
    texts: list[str],
    *,
    encoder: TextEncoder,
    cache: VectorCache | None,
    progress: bool = True,
) -> tuple[np.ndarray, CacheStats]:
    """Vectors [len(texts), d] for ``texts``, encoding only texts never seen before."""
    keys = [text_key(t) for t in texts]
    distinct = dict(zip(keys, texts, strict=True))
    stats = CacheStats(texts=len(texts), distinct=len(distinct))
    known = cache.load(encoder.fingerprint) if cache else {}
    missing = [k for k in distinct if k not in known]
    stats.hits = stats.distinct - len(missing)
    if missing:
        new = encoder.encode([distinct[k] for k in missing], progress=progress)
        stats.encoded = len(missing)
        if cache:
            cache.save(encoder.fingerprint, missing, new)
        known.update(zip(missing, new, strict=True))
    out = np.stack([known[k] for k in keys]) if keys else np.zeros((0, encoder.dim), np.float32)
    return out.astype(np.float32), stats
