"""The evaluator against metrics computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.data.split import DomainSplit
from shared.evaluation import (
    evaluate,
    metrics_from_ranks,
    paired_difference,
    ranks_from_scores,
    user_ndcg,
    user_ranks,
    user_ranks_with_offsets,
)


def test_ranks_count_ties_against_the_model() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.9, 0.3, 0.2],  # target 2 scores highest -> rank 1
            [0.2, 0.8, 0.1, 0.9, 0.5],  # target 0: 0.8, 0.9, 0.5 beat it -> rank 4
            [0.4, 0.5, 0.5, 0.1, 0.0],  # target 1 ties with item 2 -> rank 2
        ]
    )
    assert ranks_from_scores(scores, torch.tensor([2, 0, 1])).tolist() == [1, 4, 2]


def test_metrics_by_hand() -> None:
    m = metrics_from_ranks(torch.tensor([1, 4, 2]), ks=(1, 3, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(3)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)


def test_user_ndcg_averages_to_ndcg() -> None:
    ranks = torch.tensor([1, 4, 2, 11])
    assert user_ndcg(ranks).tolist() == pytest.approx([1.0, 1 / math.log2(5), 1 / math.log2(3), 0.0])
    assert float(user_ndcg(ranks).mean()) == pytest.approx(metrics_from_ranks(ranks)["ndcg@10"])


def test_paired_difference_by_hand() -> None:
    # d = [0.4, 0, 0.2]: mean 0.2, sd 0.2 (n - 1), se 0.2 / sqrt(3)
    diff = paired_difference(torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.1, 0.2, 0.1]))
    se = 0.2 / math.sqrt(3)
    assert (diff.mean, diff.se, diff.n) == (pytest.approx(0.2), pytest.approx(se), 3)
    assert diff.z == pytest.approx(math.sqrt(3))
    assert diff.interval == (pytest.approx(0.2 - 1.96 * se), pytest.approx(0.2 + 1.96 * se))
    same = paired_difference(torch.ones(5), torch.ones(5))
    assert (same.mean, same.se, same.z) == (0.0, 0.0, 0.0)


def test_paired_difference_needs_the_same_users() -> None:
    with pytest.raises(ValueError, match=r"same users.*\(4,\) and \(3,\)"):
        paired_difference(torch.zeros(4), torch.zeros(3))


def small_split() -> DomainSplit:
    # 4 items; user 0: train [1, 2], valid 3, test 4; user 1: train [4], valid 1, test 2;
    # user 2 has too short a history and is not evaluated.
    return DomainSplit(
        name="toy",
        item_ids=["a", "b", "c", "d"],
        item_texts=["a", "b", "c", "d"],
        users=["u0", "u1", "u2"],
        train=[np.array([1, 2]), np.array([4]), np.array([3])],
        valid=np.array([3, 1, 0]),
        test=np.array([4, 2, 0]),
    )


def test_new_item_targets_are_those_no_training_sequence_holds() -> None:
    # item 5 is in no training sequence; item 3 only in a user's who is not evaluated, which still
    # counts: the model trained on it. Masks follow eval_users' order (user 2 is left out).
    split = DomainSplit(
        name="toy",
        item_ids=list("abcde"),
        item_texts=list("abcde"),
        users=["u0", "u1", "u2", "u3"],
        train=[np.array([1, 2]), np.array([4]), np.array([3]), np.array([1])],
        valid=np.array([5, 3, 0, 2]),
        test=np.array([4, 5, 0, 5]),
    )
    assert split.new_item_targets("valid").tolist() == [True, False, False]
    assert split.new_item_targets("test").tolist() == [False, True, True]
    assert small_split().new_item_targets("test").tolist() == [False, False]


def next_item_scorer(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scores item (last + 1) highest, then descending by distance: a known ranking."""
    last = seqs[torch.arange(len(seqs)), lengths - 1]  # [B] item index of the last item
    items = torch.arange(1, 5)
    distance = (items.unsqueeze(0) - last.unsqueeze(1) - 1) % 4  # 0 for last + 1
    return -distance.float()


def test_evaluate_uses_the_right_history_for_each_split() -> None:
    split = small_split()
    # valid: u0 last 2 -> predicts 3 (hit, rank 1); u1 last 4 -> predicts 1 (wraps: rank 1)
    assert evaluate(next_item_scorer, split, "valid", batch_size=1)["mrr"] == pytest.approx(1.0)
    # test: u0 history [1, 2, 3] -> 4 (rank 1); u1 history [4, 1] -> 2 (rank 1)
    assert evaluate(next_item_scorer, split, "test")["recall@10"] == pytest.approx(1.0)


def test_evaluate_truncates_history_to_max_len() -> None:
    split = small_split()
    seen: list[torch.Tensor] = []

    def spy(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seen.append(seqs.clone())
        return torch.zeros(len(seqs), 4)

    m = evaluate(spy, split, "test", max_len=2)
    assert seen[0].tolist() == [[2, 3], [4, 1]]
    # all-equal scores: every target ties with all 4 items -> rank 4
    assert m["mrr"] == pytest.approx(0.25) and m["ndcg@10"] == pytest.approx(1 / math.log2(5))


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    n_items, n_users = 50, 37
    split = DomainSplit(
        name="random",
        item_ids=[str(i) for i in range(n_items)],
        item_texts=[str(i) for i in range(n_items)],
        users=[str(u) for u in range(n_users)],
        train=[rng.integers(1, n_items + 1, size=rng.integers(1, 8)) for _ in range(n_users)],
        valid=rng.integers(1, n_items + 1, size=n_users),
        test=rng.integers(1, n_items + 1, size=n_users),
    )
    table = torch.as_tensor(rng.normal(size=(n_items + 1, n_items)), dtype=torch.float32)

    def scorer(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return table[seqs[torch.arange(len(seqs)), lengths - 1]]

    assert evaluate(scorer, split, "test", batch_size=5) == evaluate(scorer, split, "test", batch_size=1000)


def test_ranks_with_offsets_are_each_offsets_own_ranking() -> None:
    """One pass over the users for F variants of a scorer (calibrate_prior's factors on the prior)."""
    split = small_split()
    offsets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, -9.0]])  # [F, N]
    together = user_ranks_with_offsets(next_item_scorer, split, "test", offsets, batch_size=1)
    assert together.shape == (3, 2)
    for offset, ranks in zip(offsets, together, strict=True):
        alone = user_ranks(lambda s, n, o=offset: next_item_scorer(s, n) + o, split, "test")
        assert ranks.tolist() == alone.tolist()
    assert together.tolist() == [[1, 1], [2, 2], [4, 1]]  # item 1 lifted above both targets; item 4 pushed last
