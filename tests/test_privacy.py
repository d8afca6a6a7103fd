"""DP correctness: per-sample gradients, a DP step's effect, composition, restarts."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from client.local_training import DPPlan, pull_towards_start, train_round
from client.per_user_linear import PerUserLinear, per_user_gradients_only
from shared.model.adapters import MoEAdapter, MoEAdapterConfig, adapter_state
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.privacy.accounting import Budget, PartnerAccountant, calibrate_noise, epsilon_of, partner_budget, poisson_schedule
from shared.privacy.item_counts import gaussian_noise, release_item_counts, user_weighted_counts


def tiny_model(*, dropout: float = 0.0, seed: int = 0, released_counts: bool = False, residual: bool = False) -> DomainModel:
    torch.manual_seed(seed)
    vectors = F.normalize(torch.randn(41, 24), dim=-1)
    vectors[0] = 0
    adapter = MoEAdapter(24, MoEAdapterConfig(n_experts=2, dim=8, dropout=dropout))
    model = DomainModel(
        adapter=adapter,
        features=ItemFeatures(vectors=vectors),
        head_config=HeadConfig(n_layers=1, max_len=6, dropout=dropout),
        item_counts=torch.arange(41.0) if released_counts else None,
        counts_noise=5.0 if released_counts else 0.0,  # as if released by release_item_counts
        leave_one_out=released_counts,
        private_residual=residual,
    )
    with torch.no_grad():  # move off the zero initialisation so that every parameter has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def users(n: int = 5, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (n,), generator=g)
    items = torch.randint(1, 41, (n, 6), generator=g)
    inputs, targets = torch.zeros(n, 5, dtype=torch.long), torch.zeros(n, 5, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        inputs[i, : k - 1], targets[i, : k - 1] = items[i, : k - 1], items[i, 1:k]
    negatives = torch.randint(1, 41, (n, 7), generator=g)
    return inputs, targets, negatives


@pytest.mark.parametrize(
    ("prior", "residual"),
    [(False, False), (True, False), (True, True)],
    ids=["text-only", "with-popularity-prior", "with-private-residual"],
)
def test_per_sample_gradients_equal_one_example_batches(prior: bool, residual: bool) -> None:
    model = tiny_model(released_counts=prior, residual=residual)
    inputs, targets, negatives = users()
    with per_user_gradients_only(model):  # as a DP round trains it
        wrapped = GradSampleModule(model, loss_reduction="mean")
        wrapped(inputs, targets, negatives).backward()
        per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
        wrapped._close()
    assert set(per_sample) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_one_example_gradients(per_sample, tiny_model(released_counts=prior, residual=residual), (inputs, targets, negatives))


def test_a_dp_step_is_the_same_without_autograds_summed_gradient() -> None:
    """Opacus overwrites a weight's summed gradient with the noised sum of the clipped per-user
    ones, so leaving it uncomputed (``per_user_gradients_only``) changes nothing: the same batch
    and the same noise give the same step, and every linear layer is an ``nn.Linear`` again after."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    inputs, targets, negatives = users()

    def one_step(model: DomainModel) -> tuple[dict[str, torch.Tensor], list[str]]:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=len(inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, dp_optimizer, _ = PrivacyEngine().make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=0.5,  # below the users' gradient norms: clipping acts
                poisson_sampling=False,
                noise_generator=torch.Generator().manual_seed(7),
            )
            module(inputs, targets, negatives).backward()
        no_summed = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
        dp_optimizer.step()
        module.remove_hooks()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, no_summed

    plain, computed = one_step(tiny_model(residual=True))
    model = tiny_model(residual=True)
    with per_user_gradients_only(model) as layers:
        skipped, not_computed = one_step(model)
    linear = sorted(f"{name}.{k}" for name, m in model.named_modules() if m in layers for k, _ in m.named_parameters())
    assert computed == [] and not_computed == linear and "adapter.experts.weight" in linear and "residual.weight" in linear
    start = dict(tiny_model(residual=True).named_parameters())
    for name in plain:
        assert not torch.equal(plain[name], start[name]), name  # the step moved every weight
        torch.testing.assert_close(skipped[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert {type(m) for m in model.modules()} & {PerUserLinear} == set()


def assert_one_example_gradients(
    per_sample: dict[str, torch.Tensor],
    reference: DomainModel,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """``per_sample[name][i]`` equals the gradient of ``reference`` on user i of ``batch`` alone, for every parameter."""
    inputs, targets, negatives = batch
    for i in range(len(inputs)):
        reference.zero_grad()
        reference(inputs[i : i + 1], targets[i : i + 1], negatives[i : i + 1]).backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=atol, rtol=rtol, msg=f"{name}, user {i}")


def _dp_round(model: DomainModel, ledger: PartnerAccountant, *, noise: float = 1.0, epochs: int = 1) -> None:
    inputs, targets, _ = users(40, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_round(
            model, TensorDataset(inputs, targets), epochs=epochs, batch_size=8, lr=1e-2, negatives=7, seed=0, dp=DPPlan(noise, 1.0, ledger)
        )


def test_dp_sampling_and_noise_do_not_follow_the_run_seed() -> None:
    """The coordinator knows the seed: under DP, which users a step sampled and the noise
    it added come from the partner's OS entropy. Without DP a seed reproduces the run."""

    def trained(dp: bool) -> dict[str, torch.Tensor]:
        model = tiny_model()  # no dropout: sampling and noise are the only randomness left
        inputs, targets, _ = users(40, seed=1)
        plan = DPPlan(1.0, 1.0, PartnerAccountant(Budget(epsilon=8.0, delta=1e-3))) if dp else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_round(model, TensorDataset(inputs, targets), epochs=1, batch_size=8, lr=1e-2, negatives=7, seed=3, dp=plan)
        return adapter_state(model.adapter)

    plain, again = trained(dp=False), trained(dp=False)
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    private, other = trained(dp=True), trained(dp=True)
    assert any(not torch.equal(private[k], other[k]) for k in private)


def test_dp_noise_is_drawn_in_opacus_floating_point_safe_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounding in one floating-point Gaussian draw can reveal the value it was added to
    (Jin et al., 2022); Opacus' secure form sums four draws. It is used without the rest of
    secure_mode (a CSPRNG that needs torchcsprng)."""
    from opacus.optimizers import optimizer as dp_optimizer

    modes: list[bool] = []
    draw = dp_optimizer._generate_noise

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        modes.append(bool(kwargs.get("secure_mode")))
        return draw(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dp_optimizer, "_generate_noise", recording)
    _dp_round(tiny_model(), PartnerAccountant(Budget(epsilon=8.0, delta=1e-3)))
    assert modes and all(modes)


def test_a_dp_step_changes_the_adapter_and_the_head() -> None:
    model = tiny_model(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PartnerAccountant(Budget(epsilon=8.0, delta=1e-3))
    _dp_round(model, ledger)
    after = model.state_dict()
    for key in adapter_state(model.adapter):
        assert not torch.equal(before[f"adapter.{key}"], after[f"adapter.{key}"]), key
    assert not torch.equal(before["head.blocks.0.attn.qkv.weight"], after["head.blocks.0.attn.qkv.weight"])
    assert ledger.steps == 5 and ledger.epsilon() > 0  # 40 users, batch 8: 5 Poisson steps
    assert PerUserLinear not in {type(m) for m in model.modules()}  # only while the DP round trains


def test_epsilon_composes_across_rounds_like_one_accountant() -> None:
    budget = Budget(epsilon=8.0, delta=1e-5)
    per_round = PartnerAccountant(budget)
    for _ in range(4):  # four rounds, each saving and reloading the ledger as a partner does
        model = tiny_model()
        _dp_round(model, per_round)
        per_round = PartnerAccountant(budget, per_round.state_dict())
    one = PartnerAccountant(budget)
    one.record((1.0, 1 / 5, 4 * 5))  # one accountant, all 20 steps at once
    assert per_round.steps == 20
    assert per_round.epsilon() == pytest.approx(one.epsilon(), rel=1e-9)


def test_calibration_spends_the_budget_over_the_planned_rounds() -> None:
    budget = partner_budget(server_epsilon=8.0, partner_cap=3.0, delta=0.0, n_users=1000, accountant="rdp")
    assert budget.epsilon == 3.0 and budget.delta == pytest.approx(1e-4)  # the partner's cap binds
    rate, steps = poisson_schedule(users=1000, batch_size=64)
    noise = calibrate_noise(budget=budget, sample_rate=rate, steps=5 * steps)
    ledger = PartnerAccountant(budget)
    for _ in range(5):
        assert ledger.can_afford(noise_multiplier=noise, sample_rate=rate, steps=steps)
        ledger.record((noise, rate, steps))
    assert 2.9 <= ledger.epsilon() <= 3.0 * 1.011
    assert not ledger.can_afford(noise_multiplier=noise, sample_rate=rate, steps=steps)  # a 6th round would overspend


def test_the_poisson_schedule_is_one_opacus_samples_and_counts_exactly() -> None:
    """Opacus' sampler takes int(1 / rate) steps an epoch and its accountant counts 1 / (those steps);
    at 1 / 93 (1 / (1 / 93) = 92.99...) that is 92 steps counted at 1 / 92, not the 93 at 1 / 93 planned."""
    from opacus.data_loader import DPDataLoader

    lowered = set()
    for users in range(1, 20_001, 7):
        for batch_size in (1, 8, 64, 256):
            rate, steps = poisson_schedule(users=users, batch_size=batch_size)
            planned = -(-users // batch_size)
            assert rate == 1 / steps and int(1 / rate) == steps  # Opacus takes exactly the steps it counts
            assert all(int(1 / (1 / s)) != s for s in range(steps + 1, planned + 1))  # the nearest such count
            assert steps >= 0.98 * planned  # a close one: batches stay near batch_size (891 becomes 888)
            lowered |= {planned} if steps < planned else set()
    assert {93, 99, 105} <= lowered
    for users in (93 * 64, 99 * 64 - 5, 105 * 64):
        rate, steps = poisson_schedule(users=users, batch_size=64)
        loader = DPDataLoader(TensorDataset(torch.zeros(users, 1)), sample_rate=rate)
        assert loader.sample_rate == rate == 1 / len(loader) and len(loader) == steps  # sampled = counted = planned


def test_a_dp_round_records_the_rate_it_planned_when_opacus_would_count_another() -> None:
    inputs, targets, _ = users(93 * 8, seed=2)  # 93 batches of 8: Opacus' own loader would count 1 / 92 for 1 / 93
    rate, steps = poisson_schedule(users=len(inputs), batch_size=8)
    accountant = PartnerAccountant(Budget(epsilon=8.0, delta=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, _ = train_round(
            tiny_model(),
            TensorDataset(inputs, targets),
            epochs=1,
            batch_size=8,
            lr=1e-2,
            negatives=7,
            seed=0,
            dp=DPPlan(1.0, 1.0, accountant),
        )
    assert (rate, steps) == (1 / 92, 92)
    assert accountant.events == [(1.0, rate, outcome.steps)] and 80 < outcome.steps <= steps
    # so a ledger line made from the plan's rate and the steps taken gives the accountant's epsilon
    assert epsilon_of([(1.0, rate, outcome.steps)], delta=1e-5, accountant="rdp") == accountant.epsilon()


def test_a_poisson_batch_that_sampled_no_user_is_still_a_noisy_step() -> None:
    """At batch size 1 over 40 users about a third of the steps sample no one (0.975 ** 40 = 0.363)."""
    inputs, targets, _ = users(40, seed=3)
    model, accountant = tiny_model(), PartnerAccountant(Budget(epsilon=8.0, delta=1e-5))
    before = {k: v.clone() for k, v in adapter_state(model.adapter).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, _ = train_round(
            model, TensorDataset(inputs, targets), epochs=3, batch_size=1, lr=1e-2, negatives=7, seed=0, dp=DPPlan(1.0, 1.0, accountant)
        )
    # every step taken and counted: skipping the empty ones would leave about 76 (none empty: chance 0.637 ** 120)
    assert outcome.steps == 3 * 40 and accountant.events == [(1.0, 1 / 40, 3 * 40)]
    assert all(not torch.equal(v, before[k]) for k, v in adapter_state(model.adapter).items())


def test_ledger_state_is_small_and_checked(tmp_path: Path) -> None:
    ledger = PartnerAccountant(Budget(epsilon=1.0, delta=1e-5))
    ledger.record((1.2, 0.01, 100))
    state = ledger.state_dict()
    assert state == {"mechanism": "rdp", "history": [[1.2, 0.01, 100]]}
    with pytest.raises(ValueError, match="kept by the 'rdp' accountant"):
        PartnerAccountant(Budget(epsilon=1.0, delta=1e-5, accountant="prv"), state)


def test_dp_training_refuses_exact_item_counts() -> None:
    base = tiny_model()
    model = DomainModel(
        adapter=base.adapter, features=base.features, head_config=HeadConfig(n_layers=1, max_len=6), item_counts=torch.ones(41)
    )
    with pytest.raises(ValueError, match="exact item counts cannot be used under DP"):
        _dp_round(model, PartnerAccountant(Budget(epsilon=8.0, delta=1e-3)))


def test_a_dp_step_trains_the_prior_weight_with_released_counts() -> None:
    model = tiny_model(released_counts=True)
    assert model.popularity is not None
    before = model.popularity.weight.detach().clone()
    _dp_round(model, PartnerAccountant(Budget(epsilon=8.0, delta=1e-3)))
    assert not torch.equal(before, model.popularity.weight.detach())


def test_released_item_counts_bound_each_user_and_compose_in_the_accountant() -> None:
    sequences = [np.array([1, 2, 2, 3]), np.array([3]), np.array([4, 1])]
    exact = user_weighted_counts(sequences, n_items=5)
    without_first = user_weighted_counts(sequences[1:], n_items=5)
    assert np.linalg.norm(exact - without_first) == pytest.approx(1.0)  # one user moves the histogram by 1 (L2)
    assert exact[0] == 0 and exact[3] == pytest.approx(1 / np.sqrt(3) + 1)
    # counting only each user's latest items keeps the bound, and counts only those
    latest = user_weighted_counts(sequences, n_items=5, window=2)
    half = 1 / np.sqrt(2)
    assert latest.tolist() == pytest.approx([0, half, half, 1 + half, half, 0])
    assert np.linalg.norm(latest - user_weighted_counts(sequences[1:], n_items=5, window=2)) == pytest.approx(1.0)
    counts, event = release_item_counts(sequences, n_items=5, noise_multiplier=5.0, rng=np.random.default_rng(0))
    assert counts.shape == (6,) and counts[0] == 0 and (counts >= 0).all() and event == (5.0, 1.0, 1)
    # the release is one Gaussian step at sample rate 1; training's noise is calibrated for what is left
    budget = Budget(epsilon=3.0, delta=1e-5)
    alone = calibrate_noise(budget=budget, sample_rate=0.01, steps=500)
    after = calibrate_noise(budget=budget, sample_rate=0.01, steps=500, spent=[event])
    assert after > alone
    total = PartnerAccountant(budget)
    total.accountant.history.extend([event, (after, 0.01, 500)])
    assert 2.95 <= total.epsilon() <= 3.0
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        release_item_counts(sequences, n_items=5, noise_multiplier=0.0, rng=np.random.default_rng(0))


class RecordingGenerator:
    """A numpy Generator's ``normal``, recording each call."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls: list[tuple[float, float, int]] = []

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        self.calls.append((loc, scale, size))
        return self.rng.normal(loc, scale, size)


def test_item_count_noise_is_drawn_in_the_floating_point_safe_form() -> None:
    """As DP-SGD's noise (above): each value the sum of four draws, halved, so its
    standard deviation is still the noise multiplier."""
    recording = RecordingGenerator(0)
    rng = cast(np.random.Generator, recording)
    release_item_counts([np.array([1, 2])], n_items=5, noise_multiplier=3.0, rng=rng)
    assert recording.calls == [(0.0, 3.0, 6)] * 4
    noise = gaussian_noise(std=3.0, size=200_000, rng=rng)
    assert noise.std() == pytest.approx(3.0, rel=0.01) and abs(noise.mean()) < 0.05


def test_a_dp_step_with_sgd_changes_the_adapter() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in adapter_state(model.adapter).items()}
    inputs, targets, _ = users(40, seed=1)
    ledger = PartnerAccountant(Budget(epsilon=8.0, delta=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_round(
            model,
            TensorDataset(inputs, targets),
            epochs=1,
            batch_size=8,
            lr=0.1,
            negatives=7,
            seed=0,
            dp=DPPlan(1.0, 1.0, ledger),
            optimizer_kind="sgd",
        )
    after = adapter_state(model.adapter)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert ledger.steps == 5


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "opacus"])
def test_the_proximal_pull_is_added_once_to_the_privatised_gradient(dp: bool) -> None:
    """FedProx's term mu x (w - w_start) joins the gradient at the step: with Opacus, after
    clipping and noise (here none), once, not dropped with the loss' non-per-sample part."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    layer, twin = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    twin.load_state_dict(layer.state_dict())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    pull_towards_start(optimizer, list(layer.parameters()), mu=2.0)
    with torch.no_grad():  # away from the start, so that the pull is not zero
        for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
            p.add_(1.0)
            q.add_(1.0)
    module: torch.nn.Module = layer
    if dp:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, optimizer, _ = PrivacyEngine().make_private(
                module=layer, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False
            )
    optimizer.zero_grad()
    F.mse_loss(module(x), y).backward()
    optimizer.step()
    F.mse_loss(twin(x), y).backward()
    for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), q.detach() - 0.5 * (q.grad + 2.0 * 1.0))
