"""One partner's local training for one round: DP-SGD (Opacus) or plain.

Under DP (see DESIGN.md, "Differential-privacy correctness"):

- one example is one user's whole training sequence; users are Poisson-sampled
  by Opacus' data loader (the accountant assumes it);
- whatever is trainable (the adapter, the private residual, the prior's weight,
  and the head with ``trains = "all"``) is trained by the one DP optimizer: the
  residual never leaves, but the adapter's later gradients depend on it;
- the loss is the sampled softmax with negatives gathered per user, so every
  trainable module sees batch-first inputs and per-sample gradients are exact;
- negatives are uniform (popularity-weighted sampling would be an unaccounted
  release) and the number of steps is fixed in advance (no early stopping).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from shared.allocator import keep_freed_memory
from shared.data.split import DomainSplit
from shared.device import model_device, on_cpu
from shared.federation.settings import OPTIMIZERS
from shared.model.recommender import DomainModel
from shared.privacy.accounting import PartnerAccountant, poisson_schedule
from shared.training import next_item_pairs


def user_sequences(split: DomainSplit, *, max_len: int) -> TensorDataset:
    """One example per user with >= 2 training items: (inputs, targets), each [U, L] right-padded."""
    seqs = [s[-(max_len + 1) :] for s in split.train if len(s) >= 2]
    return TensorDataset(*next_item_pairs(seqs, max_len))


@dataclass
class RoundOutcome:
    loss: float
    steps: int
    examples: int  # users sampled (with repetition over epochs)


@dataclass
class DPPlan:
    noise_multiplier: float
    max_grad_norm: float
    ledger: PartnerAccountant
    # The count of users the Poisson schedule is made from (client.round_privacy.RoundSchedule: a
    # partner's declared public-users, so that nothing it releases follows from its real count);
    # None: the data's own count.
    users: int | None = None


# The popularity prior's weight is one scalar: Adam moves it by about lr per step, so
# at the adapter's lr a few hundred DP steps leave it near its start; its noisy
# gradient is still dominated by signal (DP noise is sigma * C / B per coordinate).
PRIOR_LR_SCALE = 20.0


def make_optimizer(
    kind: str, params: list[torch.nn.Parameter], *, lr: float, fast: list[torch.Tensor] | None = None
) -> torch.optim.Optimizer:
    """``fast``: parameters (among ``params``) trained at ``PRIOR_LR_SCALE`` x ``lr``."""
    quick = {id(p) for p in fast or []}
    groups = [{"params": [p for p in params if id(p) not in quick], "lr": lr}]
    if quick & {id(p) for p in params}:
        groups.append({"params": [p for p in params if id(p) in quick], "lr": lr * PRIOR_LR_SCALE})
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def pull_towards_start(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *, mu: float) -> RemovableHandle:
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous
    Networks", MLSys 2020), ``mu / 2 x ||w - w_start||^2`` on ``params``: before every
    step of ``optimizer``, ``mu x (w - w_start)`` is added to their gradients.

    Added in a step pre-hook rather than to the loss: under DP, Opacus clips and
    noises only the per-sample gradients its hooks collect, and a term added to the
    loss would be dropped from them. Registered on the optimizer before Opacus wraps
    it, the hook runs after clipping and noise, on the privatised gradient; the term
    depends on no user's data (under DP the start is the global adapter the partner
    received; the personal mix, which reads validation users, is refused under DP),
    so adding it is post-processing and spends nothing. Returns the hook's handle."""
    start = {p: p.detach().clone() for p in params}

    def add_pull(*_: Any) -> None:
        with torch.no_grad():
            for p, p0 in start.items():
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=mu)

    return optimizer.register_step_pre_hook(add_pull)


def os_entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the OS's entropy pool, for DP-SGD's sampling and noise.

    Not the run's seed: the coordinator knows it, and knowing which users a step
    sampled (or the noise it added) voids the guarantee. Opacus' ``secure_mode``
    would draw from a CSPRNG, but needs ``torchcsprng``, which has no build for
    this torch; 64 bits of OS entropy into torch's generator is the practical
    substitute (the noise itself is never observed, only noisy sums)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def freeze_untrained(model: DomainModel, trains: str) -> None:
    """What a round trains: with ``trains = "adapter"`` the head stays at its
    data-independent identity start, in every round, with or without DP.

    Under DP, noise on the head's ~200 k weights, not the adapter's, pulled models
    below their start. Without DP, the head trained in 3 rounds x 2 epochs
    overfitted: adapter-only local models scored higher on both real domains
    (docs/experiments.md). A head fine-tuned without DP must never come back to a
    DP round: the adapter's gradients would then see every user through it
    (``client.partner.train`` refuses a state trained without DP)."""
    if trains == "adapter":
        model.head.requires_grad_(False)


def trim_padding(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch cut to its longest history: the columns that are padding in every row go."""
    width = int((targets > 0).sum(1).max().clamp(min=1))
    return inputs[:, :width], targets[:, :width]  # [B, W]: right-padded, so the tail is padding


def train_round(
    model: DomainModel,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    negatives: int,
    seed: int,
    dp: DPPlan | None,
    optimizer_state: dict[str, Any] | None = None,
    params: list[torch.nn.Parameter] | None = None,
    optimizer_kind: str = "adamw",
    proximal_mu: float = 0.0,
) -> tuple[RoundOutcome, dict[str, Any]]:
    """Trains ``model`` in place for ``epochs`` passes, on the device it is on; returns the
    outcome and the optimizer state (on the CPU).

    ``params`` (default: all trainable) restricts what is trained, e.g. the head
    only for a local fine-tune. ``optimizer_kind``: ``adamw``, or ``sgd`` (momentum
    0.9), whose steps scale with the (noisy) gradient instead of being normalised
    per weight as Adam's are. ``proximal_mu`` > 0 keeps the shared adapter near
    where the round started (:func:`pull_towards_start`).
    """
    keep_freed_memory()
    generator = torch.Generator().manual_seed(seed)  # negatives (and, without DP, the users' order)
    if dp is None:
        torch.manual_seed(seed)  # dropout: a run without DP is reproducible from its seed
    trainable = params if params is not None else trainable_parameters(model)
    prior = [model.popularity.weight] if model.popularity is not None else []
    optimizer = make_optimizer(optimizer_kind, trainable, lr=lr, fast=prior)
    if optimizer_state:
        with contextlib.suppress(ValueError, KeyError):  # the parameter set changed (e.g. fine-tune): start afresh
            optimizer.load_state_dict(optimizer_state)
    if proximal_mu > 0:
        pull_towards_start(optimizer, trainable_parameters(model.adapter), mu=proximal_mu)
    device = model_device(model)
    model.train()  # Opacus refuses a model in eval mode
    run = functools.partial(
        _train_epochs, epochs=epochs, negatives=negatives, n_items=model.features.n_items, generator=generator, device=device
    )
    if dp is None:
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
        return run(model, optimizer, loader), on_cpu(optimizer.state_dict())
    from client.per_user_linear import per_user_gradients_only  # imports Opacus: only under DP

    # Opacus sets each weight's gradient from the per-user ones: autograd's summed
    # gradient would be computed and thrown away (client/per_user_linear.py)
    with per_user_gradients_only(model):
        module, dp_optimizer, dp_loader = made_private(model, optimizer, data, batch_size=batch_size, dp=dp, device=device)
        outcome = run(module, dp_optimizer, dp_loader)
        module.remove_hooks()
    return outcome, on_cpu(dp_optimizer.original_optimizer.state_dict())


def made_private(
    model: DomainModel, optimizer: torch.optim.Optimizer, data: TensorDataset, *, batch_size: int, dp: DPPlan, device: torch.device
) -> tuple[Any, Any, DataLoader]:
    """Opacus' module, DP optimizer and Poisson loader for ``model``, counting in the partner's accountant.

    The loader samples at the rate of :func:`~shared.privacy.accounting.poisson_schedule`, the one the
    partner planned and records. It is built here, not by ``make_private(poisson_sampling=True)``:
    that derives the rate from a loader's length and, for some lengths, counts another rate than
    the one it samples at (see ``poisson_schedule``); so the guard that option sets is set here."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    model.check_dp_safe()
    users = dp.users or len(data)
    rate, steps = poisson_schedule(users=users, batch_size=batch_size)
    # Which users a step samples and the noise it adds must be secret: both generators are
    # seeded from OS entropy, the sampler's on the CPU (where the data is), the noise's on
    # the device of the gradients.
    loader = DPDataLoader(data, sample_rate=rate, generator=os_entropy_generator())
    if len(loader) != steps:  # Opacus' accountant counts rate 1 / len(loader); the schedule's is 1 / steps
        raise RuntimeError(
            f"Opacus' Poisson loader takes {len(loader)} steps an epoch at rate {rate}; the schedule is {steps} at 1 / {steps}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # the engine's secure_mode is off: see below
        engine = PrivacyEngine(accountant=dp.ledger.budget.accountant)
        engine.accountant = dp.ledger.accountant  # one accountant for the whole run
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples each user on its own
            noise_generator=os_entropy_generator(device),
        )
    module.forbid_grad_accumulation()  # what poisson_sampling=True would set: one backward pass per step
    # Opacus' defence against floating-point attacks on Gaussian noise (each draw the sum of four,
    # Holohan & Braghin 2021), part of its secure_mode; the rest of that mode, a CSPRNG, needs
    # torchcsprng, so the engine's flag stays off and the generators are seeded from OS entropy.
    dp_optimizer.secure_mode = True
    # The sum of clipped gradients and noise is divided by the expected batch, which Opacus takes
    # from the data's count: from the schedule's, it is the same unless public-users is declared.
    dp_optimizer.expected_batch_size = max(1, int(users * rate))
    return module, dp_optimizer, dp_loader


def _noise_only_step(optimizer: Any) -> None:
    """The DP step of a Poisson batch that sampled no user: the DP optimizer adds its noise to a
    zero gradient, moves the model and counts the step, as the sampled Gaussian mechanism (and
    its accountant) assume. Skipping it would show, in the model and in the steps taken, that
    no user was sampled: a release no accountant counts."""
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:  # Opacus' own form of an empty batch: zero per-user gradients
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def _train_epochs(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    negatives: int,
    n_items: int,
    generator: torch.Generator,
    device: torch.device,
) -> RoundOutcome:
    """``epochs`` passes over ``loader``, one optimizer step per batch, ``negatives`` items drawn per user."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus on the first layer: harmless
    losses: list[torch.Tensor] = []  # kept on the device: reading each loss would wait for the GPU every step
    steps, examples = 0, 0
    for _ in range(epochs):
        for inputs, targets in loader:
            if len(inputs) == 0:  # an empty Poisson batch (only DP's loader makes them): a step all the same
                _noise_only_step(optimizer)
                steps += 1
                continue
            inputs, targets = trim_padding(inputs, targets)
            # drawn on the CPU, so that a run's negatives are the same on any device
            negative_items = torch.randint(1, n_items + 1, (len(inputs), negatives), generator=generator)
            loss = module(inputs.to(device), targets.to(device), negative_items.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            steps += 1
            examples += len(inputs)
    mean_loss = float(torch.stack(losses).double().mean()) if losses else 0.0
    return RoundOutcome(mean_loss, steps, examples)
