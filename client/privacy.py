"""A partner's privacy budget: one accountant for the whole run, persisted.

Privacy unit: one user. One DP-SGD example is a user's whole training sequence,
users are Poisson-sampled, and adapter and head are trained by the same DP
optimizer, so the (epsilon, delta) guarantee covers everything a partner releases
from training (the adapter it sends each round).

The accountant is Opacus' (RDP or PRV); its ``state_dict`` holds only the history
of (noise multiplier, sample rate, steps), which is stored with the partner's
state after every round, so epsilon composes across rounds and restarts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class Budget:
    """What a partner may spend over the whole run."""

    epsilon: float
    delta: float
    accountant: str = "rdp"


def partner_budget(*, server_epsilon: float, partner_cap: float | None, delta: float, n_users: int, accountant: str) -> Budget:
    """The server's target, lowered to the partner's own cap; delta 0 means 1 / (10 n)."""
    epsilon = server_epsilon if partner_cap is None else min(server_epsilon, partner_cap)
    return Budget(epsilon=epsilon, delta=delta if delta > 0 else 1.0 / (10 * n_users), accountant=accountant)


def calibrate_noise(*, budget: Budget, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends exactly ``budget`` in ``steps`` steps (Opacus' search)."""
    return float(
        get_noise_multiplier(
            target_epsilon=budget.epsilon,
            target_delta=budget.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=budget.accountant,
            epsilon_tolerance=0.01,
        )
    )


class PrivacyLedger:
    """The partner's accountant and its history (the only state it needs)."""

    def __init__(self, budget: Budget, state: dict[str, Any] | None = None) -> None:
        self.budget = budget
        self.accountant: IAccountant = create_accountant(budget.accountant)
        if state and state.get("history"):
            if state.get("mechanism", budget.accountant) != budget.accountant:
                raise ValueError(
                    f"the stored ledger was kept by the {state['mechanism']!r} accountant, this run asks for {budget.accountant!r}"
                )
            self.accountant.history = [tuple(h) for h in state["history"]]

    def state_dict(self) -> dict[str, Any]:
        """Just the history (and which accountant kept it): small, JSON-serialisable."""
        return {"mechanism": self.accountant.mechanism(), "history": [list(h) for h in self.accountant.history]}

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.budget.delta))

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if ``steps`` more steps were taken (the ledger is not changed)."""
        trial = copy.deepcopy(self.accountant)
        trial.history.append((noise_multiplier, sample_rate, steps))
        return float(trial.get_epsilon(delta=self.budget.delta))

    def can_afford(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        # Calibration searches epsilon to within 1 %: allow that much above the target.
        return self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps) <= self.budget.epsilon * 1.011
