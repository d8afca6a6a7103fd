"""What a partner's round may spend, decided before it trains: its noise and its prior's release, or a decline.

:func:`plan_round` makes every check that keeps a partner inside its budgets, in
this order, and stops at the first that fails:

1. the run's delta against the partner's ``max-delta`` (default 1 / its users);
2. a run without DP against a partner that caps its epsilon (``max-epsilon``): no
   epsilon bounds it;
3. in the partner's first round, the popularity prior's item counts, a DP release
   paid from the budget (:func:`prior_counts`), and the noise multiplier, calibrated
   once for every planned round and raised to what the partner's privacy account
   over all runs has left (:class:`Lifetime`), unless that would take over
   :data:`MAX_NOISE_RAISE` times the run's own noise;
4. every round: the run's accountant must afford this round's steps, and the
   account over all runs must grant them (reserved before training, under the
   account's lock).

A declined round trains nothing and releases nothing; its ledger line says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.local_training import DPPlan
from client.private_state import PartnerState
from shared.data.split import DomainSplit
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings
from shared.privacy import account, ledger
from shared.privacy.accounting import Budget, Event, PartnerAccountant, calibrate_noise, partner_budget, poisson_schedule, release_fits
from shared.privacy.item_counts import release_item_counts, user_weighted_counts

# A run whose rounds the privacy account could fund only at over twice the run's own
# noise is declined: its adapter updates would be mostly noise, spending what is left
# of the partner's budget on making the federation's average worse.
MAX_NOISE_RAISE = 2.0


@dataclass(frozen=True)
class Lifetime:
    """A capped partner's privacy account: its cap over all runs (at the account's delta and
    order; a new account's order is not fixed yet: the best one) and the events every run has reserved so far."""

    budget: Budget
    spent: list[Event]
    runs: int

    def noise_for(self, *, sample_rate: float, steps: int, first: list[Event]) -> float:
        """The noise multiplier that fits ``steps`` steps (after the ``first`` events) into what is left; inf if nothing is."""
        try:
            return calibrate_noise(budget=self.budget, sample_rate=sample_rate, steps=steps, spent=[*self.spent, *first])
        except ValueError:
            return math.inf


def lifetime_of(spec: PartnerSpec, budget: Budget) -> Lifetime | None:
    if spec.account is None or spec.max_epsilon is None:
        return None
    entries = account.read(spec.account)
    t = account.terms(entries, delta=budget.delta)  # a new account: the best order, which its first run's plan will fix
    return Lifetime(Budget(spec.max_epsilon, t.delta, t.accountant, t.order), account.events_of(entries), len({x["run"] for x in entries}))


def prior_counts(
    settings: FederationSettings, split: DomainSplit, budget: Budget, *, lifetime: Lifetime | None = None
) -> tuple[torch.Tensor | None, float, list[Event], str]:
    """The popularity prior's counts for a partner's first round: (counts, noise, events, note).

    Without DP: exact training counts. Under DP: a user-level DP release, paid from
    the partner's budget (``events``), unless it would take more than half of it
    (or of what its privacy account has left, with a ``lifetime`` cap)."""
    if not settings.popularity_prior:
        return None, 0.0, [], ""
    if not settings.dp:  # exact, counted as the DP release counts them
        exact = user_weighted_counts(split.train, n_items=split.n_items, window=settings.popularity_window)
        return torch.as_tensor(exact), 0.0, [], ""
    sigma = settings.popularity_noise
    if not release_fits(budget=budget, counts_noise=sigma):
        note = f"no popularity prior: releasing item counts at noise {sigma:g} would take over half of epsilon {budget.epsilon:g}"
        return None, 0.0, [], note
    if lifetime is not None and not release_fits(budget=lifetime.budget, counts_noise=sigma, spent=lifetime.spent):
        note = f"no popularity prior: releasing item counts at noise {sigma:g} would take over half of what is left of this partner's lifetime epsilon {lifetime.budget.epsilon:g}"
        return None, 0.0, [], note
    # Fresh OS entropy, not the run's seed: the coordinator knows the seed.
    counts, event = release_item_counts(
        split.train,
        n_items=split.n_items,
        window=settings.popularity_window,
        noise_multiplier=sigma,
        rng=np.random.default_rng(),
    )
    return torch.as_tensor(counts), sigma, [event], ""


@dataclass(frozen=True)
class RoundSchedule:
    """A round's DP-SGD schedule over a partner's users, and the budget it is planned against."""

    budget: Budget  # the run's target lowered to the partner's cap; delta 0 means 1 / (10 x users)
    sample_rate: float  # Poisson sampling: expected batch size / users
    steps: int  # this round's steps: local epochs x steps per epoch
    users: int  # the partner's users, one training example each (user-level DP), or its declared public-users


def round_schedule(settings: FederationSettings, spec: PartnerSpec, *, n_users: int) -> RoundSchedule:
    """A round's schedule and budget for a partner of ``n_users`` users, or of the count it declares
    public (``public-users``: then nothing here follows from its real count). ``partner.train`` and
    the tests build it the same way."""
    n_users = spec.public_users or n_users
    sample_rate, per_epoch = poisson_schedule(users=n_users, batch_size=settings.batch_size)
    budget = partner_budget(
        server_epsilon=settings.target_epsilon,
        partner_cap=spec.max_epsilon,
        delta=settings.delta,
        n_users=n_users,
        accountant=settings.accountant,
    )
    return RoundSchedule(budget, sample_rate, settings.local_epochs * per_epoch, n_users)


@dataclass(frozen=True)
class RoundPrivacy:
    """A round cleared to train."""

    dp: DPPlan | None  # noise, clipping and the accountant that records the steps; None without DP
    counts: torch.Tensor | None  # the prior's counts [N + 1], first round only
    counts_noise: float
    released: list[Event]  # the counts' release, already recorded in the accountant
    note: str


@dataclass(frozen=True)
class Declined:
    note: str
    noise_multiplier: float = 0.0  # reported with the decline


def plan_round(
    *,
    settings: FederationSettings,
    spec: PartnerSpec,
    split: DomainSplit,
    state: PartnerState,
    schedule: RoundSchedule,
    accountant: PartnerAccountant,
    server_round: int,
) -> RoundPrivacy | Declined:
    """Clears a round of ``schedule``'s DP-SGD steps against its budget, or declines it (the checks: module docstring).

    The first DP round calibrates the noise multiplier and sets ``state.noise_multiplier``,
    which every later round keeps, whether this one is granted or declined for its budget
    (a round declined because the partner's account has too little left sets nothing). A granted round has its prior's
    release recorded in ``accountant`` (the steps are recorded as they are taken)
    and, for a partner with a privacy account, its events reserved there."""
    budget, sample_rate, steps = schedule.budget, schedule.sample_rate, schedule.steps
    max_delta = spec.max_delta if spec.max_delta is not None else 1.0 / schedule.users
    if settings.dp and budget.delta > max_delta:
        return Declined(
            f"declined round {server_round}: this run's delta {budget.delta:.3g} is above this partner's max-delta "
            f"{max_delta:.3g} (at a delta near 1 / users, a mechanism may reveal about one user in the clear)"
        )
    if not settings.dp and spec.max_epsilon is not None:
        return Declined(
            f"declined round {server_round}: this run trains without DP (dp = false), which no epsilon bounds; "
            f"this partner caps its epsilon at {spec.max_epsilon:g}"
        )
    # what the account has left matters where a run plans: its count release and its noise
    planning = settings.dp and (state.head is None or state.noise_multiplier is None)
    lifetime = lifetime_of(spec, budget) if planning else None
    counts: torch.Tensor | None = None
    counts_noise, released, note = 0.0, list[Event](), ""
    if state.head is None:  # the first round: the prior's counts (a DP release under DP)
        counts, counts_noise, released, note = prior_counts(settings, split, budget, lifetime=lifetime)
    if not settings.dp:
        return RoundPrivacy(None, counts, counts_noise, released, note)

    sigma = state.noise_multiplier
    if sigma is None:  # calibrated once, for every planned round
        sigma = calibrate_noise(
            budget=budget, sample_rate=sample_rate, steps=settings.rounds * steps, spent=[*accountant.events, *released]
        )
        if lifetime is not None:  # and no lower than what the account has left allows
            left = f"this partner's lifetime epsilon {lifetime.budget.epsilon:g} over {lifetime.runs + 1} run(s)"
            needed = lifetime.noise_for(sample_rate=sample_rate, steps=settings.rounds * steps, first=released)
            if needed > MAX_NOISE_RAISE * sigma:  # not kept: the next round calibrates again
                return Declined(
                    f"declined round {server_round}: too little is left of {left} (it would take noise multiplier "
                    f"{needed:.3g}, over {MAX_NOISE_RAISE:g} x this run's {sigma:.3f})"
                )
            if needed > sigma:
                note = "; ".join([*filter(None, [note]), f"noise multiplier {needed:.4f}, not {sigma:.4f}: what is left of {left}"])
                sigma = needed
        state.noise_multiplier = sigma  # kept for every later round, whether this one is granted or not
    if not accountant.can_afford(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, first=released):
        after = accountant.epsilon_after(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, first=released)
        return Declined(
            f"declined round {server_round}: epsilon would reach {after:.3f}, above this partner's budget "
            f"{budget.epsilon:g} (spent {accountant.epsilon():.3f})",
            sigma,
        )
    if spec.account is not None:  # reserved before training, under the account's lock
        got = account.reserve(
            spec.account,
            run=settings.run_id,
            server_round=server_round,
            events=ledger_events(released, sigma, sample_rate, steps, settings.max_grad_norm),
            cap=spec.max_epsilon,
            delta=budget.delta,
            plan=[*accountant.events, *released, (sigma, sample_rate, settings.rounds * steps)],  # fixes a new account's order
        )
        if not got.granted:
            return Declined(
                f"declined round {server_round}: this partner's lifetime epsilon over {got.runs} run(s) would reach "
                f"{got.after:.3f}, above its cap {spec.max_epsilon:g} (spent {got.before:.3f})",
                sigma,
            )
    for event in released:
        accountant.record(event)
    dp = DPPlan(sigma, settings.max_grad_norm, accountant, users=schedule.users)
    return RoundPrivacy(dp, counts, counts_noise, released, note)


def ledger_events(released: list[Event], sigma: float, sample_rate: float, steps: int, max_grad_norm: float) -> list[dict[str, Any]]:
    """A round's releases as ledger events: the item counts (if any), then the DP-SGD steps."""
    counts = [
        {"mechanism": "item counts", "noise_multiplier": s, "sample_rate": q, "steps": n, "max_grad_norm": 1.0} for s, q, n in released
    ]
    return [
        *counts,
        {"mechanism": "dp-sgd", "noise_multiplier": sigma, "sample_rate": sample_rate, "steps": steps, "max_grad_norm": max_grad_norm},
    ]


def ledger_entry(
    spec: PartnerSpec,
    settings: FederationSettings,
    budget: Budget,
    server_round: int,
    events: list[dict[str, Any]],
    epsilon: float,
    examples: int,
    note: str,
) -> dict[str, Any]:
    """A round's line of the partner's privacy ledger: trained (with its events) or declined (none)."""
    return ledger.make_entry(
        round=server_round,
        partner=spec.name,
        status="trained" if events else "declined",
        accountant=budget.accountant,
        delta=budget.delta,
        budget_epsilon=budget.epsilon,
        events=events,
        epsilon=epsilon,
        examples=examples,
        note=note,
    )
