"""Full-ranking evaluation (RecBole's protocol) and the two training-free baselines.

Every user's held-out item is ranked against the domain's whole catalogue;
history items are not masked (RecBole does not mask them for sequential
recommendation, so numbers compare with published ones). Ties count against the
model: rank = number of items scoring at least as high as the target.

With rank r of the single target item:

- Recall@K = 1[r <= K]
- NDCG@K   = 1[r <= K] / log2(r + 1)   (one relevant item, so IDCG = 1)
- MRR      = 1 / r                      (untruncated)

each averaged over evaluated users. Two models scored on the same users compare
user by user (:func:`paired_difference`): the interval of their difference in
NDCG@10 says whether a change is more than the users' noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.data.split import DomainSplit

KS = (10, 20, 50)
METRIC_NAMES = (*(f"{m}@{k}" for k in KS for m in ("recall", "ndcg")), "mrr")

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (seqs [B, L], lengths [B]) -> [B, N]


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target. scores [B, N], targets [B] (0-based columns)."""
    target_scores = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    return (scores >= target_scores).sum(1)  # [B]; the target counts itself


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        return {**{f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}, "mrr": 0.0}
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"recall@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(r + 1)).mean())
    out["mrr"] = float((1.0 / r).mean())
    return out


def pad_histories(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Most recent ``max_len`` items, right-padded: seqs [B, L], lengths [B]."""
    cut = [h[-max_len:] for h in histories]
    lengths = torch.tensor([len(h) for h in cut], dtype=torch.long)
    seqs = torch.zeros(len(cut), int(lengths.max()) if len(cut) else 1, dtype=torch.long)
    for i, h in enumerate(cut):
        seqs[i, : len(h)] = torch.as_tensor(h)
    return seqs, lengths


@torch.no_grad()
def user_ranks(
    scorer: Scorer,
    split: DomainSplit,
    which: str,
    *,
    max_len: int = 50,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Rank of each evaluated user's ``which`` ("valid"/"test") target [U], in ``split.eval_users``
    order (users without history are left out), so two models' ranks pair user by user."""
    ranks = [ranks_from_scores(s, t).cpu() for s, t in _scored_batches(scorer, split, which, max_len, batch_size, device)]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def user_ranks_with_offsets(
    scorer: Scorer,
    split: DomainSplit,
    which: str,
    offsets: torch.Tensor,
    *,
    max_len: int = 50,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """:func:`user_ranks` of ``scorer`` plus each row of ``offsets`` [F, N] (a score added to every
    item), [F, U]: F variants of one model scored in one pass over the users."""
    offsets = offsets.to(device)
    ranks = [
        torch.stack([ranks_from_scores(s + o, t) for o in offsets]).cpu()  # [F, B]
        for s, t in _scored_batches(scorer, split, which, max_len, batch_size, device)
    ]
    return torch.cat(ranks, dim=1) if ranks else torch.zeros(len(offsets), 0, dtype=torch.long)


def _scored_batches(
    scorer: Scorer, split: DomainSplit, which: str, max_len: int, batch_size: int, device: str | torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(scores [B, N], 0-based targets [B]) of the evaluated users with a history, in order."""
    users = split.eval_users(which)
    targets = split.valid if which == "valid" else split.test
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        users_with_history = [u for u in batch if len(split.history(u, which))]
        if not users_with_history:
            continue
        seqs, lengths = pad_histories([split.history(u, which) for u in users_with_history], max_len)
        scores = scorer(seqs.to(device), lengths.to(device))  # [B, N]
        yield scores, torch.as_tensor(targets[users_with_history] - 1, device=scores.device)


def evaluate(
    scorer: Scorer,
    split: DomainSplit,
    which: str,
    *,
    max_len: int = 50,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Metrics of ``scorer`` on the ``which`` ("valid"/"test") targets of ``split``."""
    return metrics_from_ranks(user_ranks(scorer, split, which, max_len=max_len, batch_size=batch_size, device=device))


def user_ndcg(ranks: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Each user's NDCG@k [U] from its target's rank [U]: 1[r <= k] / log2(r + 1); their mean is NDCG@k."""
    r = ranks.to(torch.float64)
    return torch.where(r <= k, 1.0 / torch.log2(r + 1), torch.zeros_like(r))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a per-user difference ``a - b`` with its normal-approximation interval.

    With d_i = a_i - b_i over n users: mean = sum(d_i) / n, se = sd(d) / sqrt(n)
    (sd with n - 1), z = mean / se, 95 % interval = mean +- 1.96 se. Pairing
    takes out what the two models share (the users' difficulty), so a change far
    smaller than either score's own spread can still be told from noise.
    """

    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - 1.96 * self.se, self.mean + 1.96 * self.se


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> PairedDifference:
    """:class:`PairedDifference` of per-user scores ``a`` and ``b`` [U] (the same users, in the same order)."""
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired scores need the same users (at least 2): got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.to(torch.float64) - b.to(torch.float64)
    return PairedDifference(float(d.mean()), float(d.std(correction=1)) / math.sqrt(len(d)), len(d))


def popularity_scorer(split: DomainSplit) -> Scorer:
    """Scores every item by its training interaction count."""
    pop = torch.as_tensor(split.item_popularity()[1:], dtype=torch.float32)

    def score(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pop.to(seqs.device).expand(len(seqs), -1)

    return score


def text_similarity_scorer(vectors: np.ndarray | torch.Tensor, *, last: int = 1) -> Scorer:
    """Cosine between the mean frozen text vector of the last ``last`` items and every item.

    ``vectors`` [N + 1, d_enc] with row 0 = padding.
    """
    v = torch.nn.functional.normalize(torch.as_tensor(vectors, dtype=torch.float32), dim=-1)

    def score(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        vv = v.to(seqs.device)
        idx = torch.arange(seqs.shape[1], device=seqs.device)
        recent = (idx < lengths.unsqueeze(1)) & (idx >= (lengths - last).unsqueeze(1))  # [B, L]
        query = (vv[seqs] * recent.unsqueeze(-1)).sum(1)  # [B, d]
        return torch.nn.functional.normalize(query, dim=-1) @ vv[1:].T

    return score


def baselines(split: DomainSplit, vectors: np.ndarray, *, max_len: int = 50) -> dict[str, dict[str, dict[str, float]]]:
    """Popularity and text similarity (last 1, 2 or 3 items; the best on valid is kept)."""
    out = {"popularity": {w: evaluate(popularity_scorer(split), split, w, max_len=max_len) for w in ("valid", "test")}}
    best: dict[str, dict[str, float]] | None = None
    for last in (1, 2, 3):
        scorer = text_similarity_scorer(vectors, last=last)
        res = {w: evaluate(scorer, split, w, max_len=max_len) for w in ("valid", "test")}
        res["last_items"] = {"n": float(last)}
        if best is None or res["valid"]["ndcg@10"] > best["valid"]["ndcg@10"]:
            best = res
    assert best is not None
    out["text_similarity"] = best
    return out
