"""Model pieces that the federation and DP will rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from shared.encoder import TextEncoder
from shared.model import recommender
from shared.model.adapters import LoraAdapterConfig, MoEAdapter, MoEAdapterConfig, build_adapter
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.privacy.item_counts import user_weighted_counts
from simulations.bench_lora_step import every_row_item_vectors


def small_model(item_ids: bool = False, counts: torch.Tensor | None = None, residual: bool = False) -> DomainModel:
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(31, 48), dim=-1)
    vectors[0] = 0
    adapter = MoEAdapter(48, MoEAdapterConfig(n_experts=2, dim=16))
    return DomainModel(
        adapter=adapter,
        features=ItemFeatures(vectors=vectors),
        head_config=HeadConfig(max_len=8),
        item_ids=item_ids,
        item_counts=counts,
        private_residual=residual,
    )


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]])
    targets = torch.tensor([[2, 3, 10, 0], [5, 6, 7, 11], [9, 12, 0, 0]])
    negatives = torch.randint(1, 31, (3, 5), generator=torch.Generator().manual_seed(1))
    return seqs, targets, negatives


def test_untrained_head_returns_the_last_items_own_vector() -> None:
    model = small_model().eval()
    seqs, _, _ = batch()
    states = model.user_states(seqs)  # [B, L, d]
    own = F.normalize(model.item_vectors(seqs), dim=-1)
    real = seqs > 0
    torch.testing.assert_close(states[real], own[real])


def test_a_private_residual_starts_as_nothing_and_is_not_part_of_the_adapter() -> None:
    plain, with_residual = small_model().eval(), small_model(residual=True).eval()
    seqs, targets, negatives = batch()
    torch.testing.assert_close(with_residual.sampled_loss(seqs, targets, negatives), plain.sampled_loss(seqs, targets, negatives))
    assert set(with_residual.adapter.state_dict()) == set(plain.adapter.state_dict())  # what a partner sends
    assert with_residual.residual is not None and with_residual.residual.weight.requires_grad
    with torch.no_grad():
        with_residual.residual.weight.normal_()
    assert not torch.allclose(with_residual.item_vectors(seqs), plain.item_vectors(seqs))


def test_sampled_loss_is_a_mean_of_independent_per_user_losses() -> None:
    """What DP-SGD needs: one user's loss never depends on another's rows."""
    model = small_model().eval()
    seqs, targets, negatives = batch()
    together = model.sampled_loss(seqs, targets, negatives)
    alone = torch.stack([model.sampled_loss(seqs[i : i + 1], targets[i : i + 1], negatives[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone.mean())


def test_sampled_loss_equals_the_loss_from_separate_history_target_and_negative_rows() -> None:
    """The loss runs the adapter once on each user's sequence and negatives; nothing is lost by that."""
    model = small_model().eval()
    seqs, targets, negatives = batch()
    states = model.user_states(seqs)  # the history's own rows, padding as item 0
    positives = F.normalize(model.item_vectors(targets), dim=-1)
    others = F.normalize(model.item_vectors(negatives), dim=-1)
    clash = negatives.unsqueeze(1) == targets.unsqueeze(-1)  # [B, L, K]
    negative_logits = torch.einsum("bld,bkd->blk", states, others).masked_fill(clash, float("-inf"))
    logits = torch.cat([(states * positives).sum(-1, keepdim=True), negative_logits], -1)
    mask = targets > 0
    expected = (-F.log_softmax(logits / model.temperature, -1)[..., 0] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(model.per_user_loss(seqs, targets, negatives), expected)


def test_sampled_loss_refuses_targets_that_are_not_the_next_items() -> None:
    model = small_model()
    seqs, targets, negatives = batch()
    with pytest.raises(ValueError, match="shifted by one"):
        model.per_user_loss(seqs, targets.roll(1, dims=1), negatives)


def test_sampled_loss_ignores_negatives_equal_to_the_target() -> None:
    model = small_model().eval()
    seqs, targets, negatives = batch()
    with_clash = torch.cat([negatives, targets[:, :1]], dim=1)  # each user's first target as a negative
    manual = model.per_user_loss(seqs, targets, negatives)
    clashing = model.per_user_loss(seqs, targets, with_clash)
    # the clashing negative is masked at the position whose target it is, so position 0
    # is unchanged; other positions see one more negative and a larger loss
    assert torch.all(clashing >= manual - 1e-6)
    single = model.per_user_loss(seqs[:, :1], targets[:, :1], with_clash)
    torch.testing.assert_close(single, model.per_user_loss(seqs[:, :1], targets[:, :1], negatives))


def test_full_loss_and_scores_agree_with_catalogue() -> None:
    model = small_model(item_ids=True).eval()
    seqs, targets, _ = batch()
    lengths = (seqs > 0).sum(1)
    scores = model.score_all(seqs, lengths)  # [B, N]
    assert scores.shape == (3, 30)
    last = model.last_states(seqs, lengths)
    torch.testing.assert_close(scores, last @ model.catalogue().T / model.temperature)
    loss = model.full_loss(seqs, targets)
    loss.backward()
    assert model.item_ids is not None and model.item_ids.weight.grad is not None


def test_popularity_prior_adds_weight_times_log_count_to_every_score() -> None:
    counts = torch.arange(31)  # item i was a training target i times
    model = small_model(counts=counts).eval()
    seqs, targets, negatives = batch()
    lengths = (seqs > 0).sum(1)
    assert model.popularity is not None
    text_only = model.score_all(seqs, lengths)  # the weight starts at 0: no effect
    with torch.no_grad():
        model.popularity.weight.fill_(0.5)
    torch.testing.assert_close(model.score_all(seqs, lengths) - text_only, (0.5 * torch.log1p(counts[1:].float())).expand(3, -1))
    # both losses train the weight; the sampled loss stays a mean of per-user losses
    model.full_loss(seqs, targets).backward()
    assert model.popularity.weight.grad is not None and model.popularity.weight.grad.abs().sum() > 0
    alone = torch.stack([model.sampled_loss(seqs[i : i + 1], targets[i : i + 1], negatives[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(model.sampled_loss(seqs, targets, negatives), alone.mean())
    # the counts travel with the private head, never with the adapter
    assert "log_counts" in model.state_dict() and all("count" not in k for k in model.adapter.state_dict())


@pytest.mark.parametrize("window", [0, 1, 2])
def test_leave_one_out_takes_each_users_own_share_out_of_their_items_counts(window: int) -> None:
    seqs, targets, negatives = batch()
    sequences = [torch.cat([s[:1], t[t > 0]]).numpy() for s, t in zip(seqs, targets, strict=True)]
    counts = torch.as_tensor(user_weighted_counts(sequences, n_items=30, window=window))
    model = small_model(counts=counts)
    model.leave_one_out, model.counts_window = True, window
    assert model.popularity is not None
    with torch.no_grad():
        model.popularity.weight.fill_(1.0)
    sequence = torch.cat([seqs[:, :1], targets], 1)
    rows = torch.cat([sequence, negatives], 1)
    bias = model.item_bias(rows, own_share=model._own_share(rows, model._counted(sequence)))
    for b, whole in enumerate(sequences):
        own = whole[-window:] if window else whole  # the items this user's share was counted on
        others = user_weighted_counts([s for i, s in enumerate(sequences) if i != b], n_items=30, window=window)
        for r, item in enumerate(rows[b].tolist()):
            expected = 0.0 if item == 0 else np.log1p(others[item]) if item in own else np.log1p(counts[item].item())
            assert bias[b, r].item() == pytest.approx(expected, abs=1e-5), (b, item)


def test_popularity_prior_with_exact_counts_is_refused_under_dp() -> None:
    model = small_model(counts=torch.ones(31))
    with pytest.raises(ValueError, match=r"exact item counts cannot be used under DP.*mix every user's data"):
        model.check_dp_safe()
    small_model().check_dp_safe()  # text only: fine
    released = DomainModel(
        adapter=model.adapter, features=model.features, head_config=HeadConfig(max_len=8), item_counts=torch.ones(31), counts_noise=5.0
    )
    released.check_dp_safe()  # counts released with DP noise: fine


def test_a_model_saved_with_the_old_scalar_prior_weight_loads() -> None:
    model = small_model(counts=torch.arange(31))
    old = {k: v for k, v in model.state_dict().items() if k not in ("popularity.weight", "counts_noise")}
    old["popularity_weight"] = torch.tensor(0.7)
    fresh = small_model(counts=torch.zeros(31))
    fresh.load_state_dict(old)
    assert fresh.popularity is not None and float(fresh.popularity.weight.detach()) == pytest.approx(0.7)
    assert fresh.counts_noise is not None and float(fresh.counts_noise) == 0.0


def lora_model(encoder_path: Path) -> DomainModel:
    torch.manual_seed(0)
    encoder = TextEncoder(encoder_path)
    texts = ["", *(f"item {i}: a {'long ' * (i % 5)}text" for i in range(1, 9))]
    adapter = build_adapter(LoraAdapterConfig(r=4, dropout=0.0), in_dim=encoder.dim, encoder_model=encoder.model)
    with torch.no_grad():  # LoRA's B starts at 0; give both factors a gradient
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return DomainModel(adapter=adapter, features=ItemFeatures(tokens=encoder.tokenize(texts)), head_config=HeadConfig(max_len=8))


@pytest.mark.parametrize(("chunk", "calls"), [(256, [5]), (2, [2, 2, 1])])
def test_lora_encodes_each_distinct_item_once_with_every_rows_value_and_gradient(
    tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, calls: list[int]
) -> None:
    """Items encoded once each, in chunks sorted by length, give every row what encoding every row gives."""
    monkeypatch.setattr(recommender, "LORA_CHUNK", chunk)
    model = lora_model(tiny_encoder)
    index = torch.tensor([[1, 2, 2, 0], [3, 1, 0, 0], [8, 8, 8, 8]])  # [B, R]: padding, repeats
    encoded: list[int] = []
    hook = model.adapter.register_forward_pre_hook(lambda _m, args: encoded.append(int(args[0].shape[0])))
    weights = torch.randn(*index.shape, model.dim)
    trainable = [p for p in model.adapter.parameters() if p.requires_grad]

    out = model.item_vectors(index)  # [B, R, d]
    grads = torch.autograd.grad((out * weights).sum(), trainable)
    assert encoded == calls  # items 0, 1, 2, 3, 8 once each, not 12 rows

    # the reference: the adapter on every row, as before items were encoded once (the benchmark's)
    every_row = every_row_item_vectors(model, index)
    hook.remove()
    torch.testing.assert_close(out, every_row)
    for got, want in zip(grads, torch.autograd.grad((every_row * weights).sum(), trainable), strict=True):
        torch.testing.assert_close(got, want)


def test_a_lora_model_is_refused_under_dp(tiny_encoder: Path) -> None:
    with pytest.raises(ValueError, match=r"lora adapter cannot train under DP.*not be per user.*use the moe adapter"):
        lora_model(tiny_encoder).check_dp_safe()
