"""What a round may spend, decided before it trains (client.round_privacy.plan_round): no encoder, no training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from client.private_state import PartnerState
from client.round_privacy import Declined, RoundPrivacy, RoundSchedule, plan_round, round_schedule
from shared.data.split import DomainSplit
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings
from shared.privacy import account
from shared.privacy.accounting import PartnerAccountant

USERS, ITEMS = 400, 30
BOOKS = PartnerSpec("books", Path("unused"))  # plan_round reads no data files


def split_of(seed: int = 0) -> DomainSplit:
    rng = np.random.default_rng(seed)
    return DomainSplit(
        name="books",
        item_ids=[f"i{i}" for i in range(ITEMS)],
        item_texts=[f"item {i}" for i in range(ITEMS)],
        users=[f"u{u}" for u in range(USERS)],
        train=[rng.integers(1, ITEMS + 1, size=5) for _ in range(USERS)],
        valid=rng.integers(1, ITEMS + 1, size=USERS),
        test=rng.integers(1, ITEMS + 1, size=USERS),
    )


def plan(
    settings: FederationSettings, spec: PartnerSpec, state: PartnerState
) -> tuple[RoundPrivacy | Declined, PartnerAccountant, RoundSchedule]:
    """Plans round 1 of ``settings``' run; returns the plan, the accountant and the round's schedule."""
    schedule = round_schedule(settings, spec, n_users=USERS)
    accountant = PartnerAccountant(schedule.budget, state.accountant)
    out = plan_round(
        settings=settings,
        spec=spec,
        split=split_of(),
        state=state,
        schedule=schedule,
        accountant=accountant,
        server_round=1,
    )
    return out, accountant, schedule


def test_a_first_dp_round_calibrates_its_noise_for_every_planned_round_and_records_only_the_prior_release() -> None:
    settings = FederationSettings(rounds=3, target_epsilon=4.0, popularity_prior=True)
    state = PartnerState()
    out, accountant, schedule = plan(settings, BOOKS, state)
    assert isinstance(out, RoundPrivacy) and out.dp is not None and out.counts is not None
    assert out.dp.noise_multiplier == state.noise_multiplier and out.dp.ledger is accountant
    assert out.counts_noise == settings.popularity_noise and len(out.released) == 1
    assert accountant.events == out.released  # the steps are recorded as they are taken, not before
    # all planned rounds at this noise, after the counts, spend the budget (to the calibration's tolerance)
    planned = accountant.epsilon_after(
        noise_multiplier=out.dp.noise_multiplier, sample_rate=schedule.sample_rate, steps=settings.rounds * schedule.steps
    )
    assert 4.0 * 0.98 <= planned <= 4.0 + 1e-9


def test_a_round_without_dp_has_exact_counts_and_no_plan() -> None:
    out, accountant, _ = plan(FederationSettings(dp=False, popularity_prior=True), BOOKS, PartnerState())
    assert isinstance(out, RoundPrivacy) and out.dp is None and out.released == [] and accountant.events == []
    assert out.counts is not None and out.counts_noise == 0.0


@pytest.mark.parametrize(
    ("settings", "spec", "state", "reason"),
    [
        (
            FederationSettings(delta=0.1),
            BOOKS,
            PartnerState(),
            "delta 0.1 is above this partner's max-delta",
        ),
        (FederationSettings(dp=False), dataclasses.replace(BOOKS, max_epsilon=8.0), PartnerState(), "trains without DP"),
        (FederationSettings(), BOOKS, PartnerState(noise_multiplier=0.05), "epsilon would reach"),
    ],
    ids=["delta-above-max", "no-dp-for-a-capped-partner", "over-budget"],
)
def test_a_declined_round_records_and_reserves_nothing(
    tmp_path: Path, settings: FederationSettings, spec: PartnerSpec, state: PartnerState, reason: str
) -> None:
    spec = dataclasses.replace(spec, account=tmp_path / "account.jsonl")
    out, accountant, _ = plan(settings, spec, state)
    assert isinstance(out, Declined) and reason in out.note
    assert accountant.events == []  # not even the prior's counts, drawn before the decline
    assert account.read(tmp_path / "account.jsonl") == []


def test_a_capped_account_that_cannot_fund_the_run_declines_it(tmp_path: Path) -> None:
    settings = FederationSettings(rounds=1, target_epsilon=4.0)
    spec = dataclasses.replace(BOOKS, max_epsilon=4.0, account=tmp_path / "account.jsonl")
    first, _, _ = plan(settings, spec, PartnerState())
    assert isinstance(first, RoundPrivacy)  # its one round, reserved in the account, takes all of the cap
    state = PartnerState()
    second, _, _ = plan(FederationSettings(rounds=2, target_epsilon=4.0, run_id="next"), spec, state)
    assert isinstance(second, Declined) and "too little is left of this partner's lifetime epsilon 4 over 2 run(s)" in second.note
    assert state.noise_multiplier is None  # the next round plans afresh
    assert [x["run"] for x in account.read(tmp_path / "account.jsonl")] == [settings.run_id]
