"""A partner's privacy budget: one accountant for the whole run, persisted.

Privacy unit: one user. One DP-SGD example is a user's whole training sequence,
users are Poisson-sampled, and whatever a partner trains in the federation (the
adapter, and the head with ``trains = "all"``) is trained by the one DP
optimizer, so the (epsilon, delta) guarantee covers the trained weights a partner
releases (the adapter it sends each round). The statistics it reports beside them
(the round's mean training loss, its evaluation metrics) are not covered: the
privacy report lists them under "What is not protected".

The accountant is Opacus' (RDP or PRV); its ``state_dict`` holds only the history
of (noise multiplier, sample rate, steps), which is stored with the partner's
state after every round, so epsilon composes across rounds and restarts.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")

# One DP-SGD event: (noise multiplier, sample rate, steps), Opacus' history entry.
Event = tuple[float, float, int]


@dataclass(frozen=True)
class Budget:
    """What a partner may spend over the whole run (or, with ``order``, over a privacy account's every run)."""

    epsilon: float
    delta: float
    accountant: str = "rdp"
    order: float | None = None  # RDP at this one Rényi order, not the best one: a privacy account's (see epsilon_of)

    def spent_on(self, events: list[Event]) -> float:
        """Epsilon of ``events`` as this budget counts them (its delta, accountant and order)."""
        return epsilon_of(events, delta=self.delta, accountant=self.accountant, order=self.order)


def partner_budget(*, server_epsilon: float, partner_cap: float | None, delta: float, n_users: int, accountant: str) -> Budget:
    """The server's target, lowered to the partner's own cap; delta 0 means 1 / (10 n)."""
    epsilon = server_epsilon if partner_cap is None else min(server_epsilon, partner_cap)
    return Budget(epsilon=epsilon, delta=delta if delta > 0 else 1.0 / (10 * n_users), accountant=accountant)


def merge_events(events: list[Event]) -> list[Event]:
    """Consecutive events with the same noise and rate as one (Opacus merges them the same way)."""
    merged: list[Event] = []
    for sigma, rate, steps in events:
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def epsilon_of(events: list[Event], *, delta: float, accountant: str, order: float | None = None) -> float:
    """Epsilon at ``delta`` after ``events``, by Opacus' ``accountant`` (0 for no events).

    With ``order``: RDP at that one Rényi order (``accountant`` must be "rdp"), as a privacy
    filter needs. Events chosen one after another, each from what the ones before spent (a
    partner's runs), compose as RDP only at an order fixed in advance (Feldman & Zrnic,
    "Individual Privacy Accounting via a Rényi Filter", NeurIPS 2021); the best order, or PRV,
    is proven for parameters fixed in advance only."""
    bad = [e for e in events if not (math.isfinite(e[0]) and e[0] > 0 and 0 < e[1] <= 1 and e[2] >= 0)]
    if bad:  # Opacus' RDP never returns on an infinite noise multiplier
        raise ValueError(f"events {bad}: expected (noise multiplier finite and above 0, 0 < sample rate <= 1, steps >= 0)")
    history = [e for e in merge_events(events) if e[2] > 0]
    if not history:
        return 0.0
    if order is not None and accountant != "rdp":
        raise ValueError(f"an epsilon at one order is RDP's; got the {accountant!r} accountant")
    acc = create_accountant(accountant)
    acc.history = history
    with _quiet_accounting():
        return float(acc.get_epsilon(delta=delta) if order is None else acc.get_epsilon(delta=delta, alphas=[order]))


def best_order(events: list[Event], *, delta: float) -> float:
    """The Rényi order (of Opacus' RDP accountant's) at which ``events`` spend the least epsilon at ``delta``."""
    acc = RDPAccountant()
    acc.history = [e for e in merge_events(events) if e[2] > 0]
    with _quiet_accounting():
        return float(acc.get_privacy_spent(delta=delta)[1])


@contextlib.contextmanager
def _quiet_accounting() -> Iterator[None]:
    """Silences Opacus' harmless numerical chatter."""
    # np.errstate: PRV at sample rate 1 (an item-count release) evaluates log(1 - q) in
    # a branch np.where then discards.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP at very low noise: "optimal order is the largest alpha" (a loose but valid bound); at one
        # fixed order, it is the largest and the smallest.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def counts_release_event(noise_multiplier: float) -> Event:
    """An item-count release (:mod:`shared.privacy.item_counts`) as the accountant sees it:
    one Gaussian step at sample rate 1 (sensitivity 1 per user)."""
    return (float(noise_multiplier), 1.0, 1)


def calibrate_noise(*, budget: Budget, sample_rate: float, steps: int, spent: list[Event] | None = None) -> float:
    """The smallest noise multiplier (to 1 % of epsilon) whose ``steps`` steps, after the
    ``spent`` events (e.g. the release of item counts), stay within ``budget``.

    Opacus' search keeps the multiplier whose epsilon is below the target, so the
    plan never overshoots; checked again here, because the partner's cap binds.
    """
    with _quiet_accounting():
        sigma = float(
            get_noise_multiplier(
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=budget.accountant,
                epsilon_tolerance=0.01,
            )
        )
    prior = list(spent or [])

    def over(noise: float) -> bool:
        return budget.spent_on([*prior, (noise, sample_rate, steps)]) > budget.epsilon

    if over(sigma):  # the earlier events took part of the budget, or the order is fixed: bisect upwards
        low, high = sigma, 2 * sigma
        while over(high):
            low, high = high, 2 * high
            if high > 1e4:
                raise ValueError(f"the events already spent leave nothing of epsilon {budget.epsilon:g} for training")
        while (high - low) > 0.001 * low:
            mid = (low + high) / 2
            low, high = (mid, high) if over(mid) else (low, mid)
        sigma = high
    while over(sigma):
        sigma *= 1.001  # pragma: no cover - a numerical safety net, never taken in the tests
    return sigma


class PartnerAccountant:
    """The partner's accountant and its history (the only state it needs)."""

    def __init__(self, budget: Budget, state: dict[str, Any] | None = None) -> None:
        self.budget = budget
        self.accountant: IAccountant = create_accountant(budget.accountant)
        if state and state.get("history"):
            if state.get("mechanism", budget.accountant) != budget.accountant:
                raise ValueError(
                    f"the stored history was kept by the {state['mechanism']!r} accountant, this run asks for {budget.accountant!r}"
                )
            self.accountant.history = [tuple(h) for h in state["history"]]

    def state_dict(self) -> dict[str, Any]:
        """Just the history (and which accountant kept it): small, JSON-serialisable."""
        return {"mechanism": self.accountant.mechanism(), "history": [list(h) for h in self.accountant.history]}

    @property
    def events(self) -> list[Event]:
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    def epsilon(self) -> float:
        return epsilon_of(self.events, delta=self.budget.delta, accountant=self.budget.accountant)

    def record(self, event: Event) -> None:
        """Adds a release made outside Opacus' optimizer (DP-SGD's steps are recorded by its hook)."""
        self.accountant.history.append(event)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int, first: Sequence[Event] = ()) -> float:
        """Epsilon if the ``first`` events, then ``steps`` more steps were taken (the history is not changed)."""
        events = [*self.events, *first, (noise_multiplier, sample_rate, steps)]
        return epsilon_of(events, delta=self.budget.delta, accountant=self.budget.accountant)

    def can_afford(self, *, noise_multiplier: float, sample_rate: float, steps: int, first: Sequence[Event] = ()) -> bool:
        """Whether the round (after the ``first`` events) stays within the budget. Strict: the partner's cap binds."""
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, first=first)
        return after <= self.budget.epsilon + 1e-9


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """A noise multiplier for a run, and the epsilon it spends after each round."""

    noise_multiplier: float
    accountant: str
    epsilon: float  # after all rounds, by ``accountant``
    delta: float
    sample_rate: float
    steps: int  # all rounds together
    rounds: int
    per_round: dict[str, list[float]]  # accountant -> epsilon after round 1..R, same multiplier
    multipliers: dict[str, float]  # accountant -> the multiplier it alone would pick
    counts_noise: float  # of round 1's item-count release; 0: none, or skipped (see release_fits)


def release_fits(*, budget: Budget, counts_noise: float, spent: Sequence[Event] = ()) -> bool:
    """Whether an item-count release at ``counts_noise`` spends at most half of what ``budget``
    leaves after the ``spent`` events (e.g. earlier runs in a partner's privacy account).

    Partners skip a release that does not fit (and train without the prior): more
    would leave training too little, e.g. noise 3 alone spends ~1.2 at delta 1e-5."""
    before = budget.spent_on(list(spent))
    after = budget.spent_on([*spent, counts_release_event(counts_noise)])
    return after - before <= (budget.epsilon - before) / 2


def poisson_schedule(*, users: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) of DP-SGD's Poisson sampling over ``users``, about
    ``batch_size`` of them a step: ``steps`` steps at rate ``1 / steps``.

    ``steps`` is ``ceil(users / batch_size)``, lowered to the nearest count Opacus takes exactly:
    its Poisson sampler takes ``int(1 / rate)`` steps an epoch and its accountant counts rate
    ``1 / (those steps)``, and in floating point ``1 / (1 / 93)`` is just below 93 (likewise 99,
    105, ..., 70 of the first 1,000 counts; 211 and 210 both, so 211 becomes 209). At 1 / 93
    Opacus would take 92 steps and count 1 / 92: a ledger that states the plan fails verification."""
    steps = max(1, math.ceil(users / batch_size))
    while int(1 / (1 / steps)) != steps:
        steps -= 1
    return 1.0 / steps, steps


def schedule_from_users(*, users: int, batch_size: int, rounds: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate, steps over all rounds) of the federation's Poisson schedule."""
    rate, per_epoch = poisson_schedule(users=users, batch_size=batch_size)
    return rate, rounds * local_epochs * per_epoch


def plan(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    rounds: int = 1,
    accountant: str = "rdp",
    counts_noise: float = 0.0,
) -> Plan:
    """The noise that spends at most ``epsilon`` in ``steps`` steps, split evenly over ``rounds``,
    after the item-count release at ``counts_noise`` (0: none) in round 1, as partners calibrate
    (and, as they do, without the release where it does not fit: :func:`release_fits`)."""
    if steps % rounds:
        raise ValueError(f"--steps {steps} is not a multiple of --rounds {rounds}")
    if counts_noise > 0 and not release_fits(budget=Budget(epsilon, delta, accountant), counts_noise=counts_noise):
        counts_noise = 0.0
    spent = [counts_release_event(counts_noise)] if counts_noise > 0 else []
    multipliers = {
        name: calibrate_noise(budget=Budget(epsilon, delta, name), sample_rate=sample_rate, steps=steps, spent=spent)
        for name in ACCOUNTANTS
    }
    sigma = multipliers[accountant]
    per = steps // rounds
    per_round = {
        name: [epsilon_of([*spent, (sigma, sample_rate, per * r)], delta=delta, accountant=name) for r in range(1, rounds + 1)]
        for name in ACCOUNTANTS
    }
    return Plan(sigma, accountant, per_round[accountant][-1], delta, sample_rate, steps, rounds, per_round, multipliers, counts_noise)
