"""Epsilon recomputed by an independent implementation: Google's dp-accounting.

The project's own numbers come from Opacus' accountants. A privacy officer should
not have to trust one library's arithmetic, so the report recomputes every
partner's epsilon from its ledger's events with dp-accounting, both by RDP (on
Opacus' grid of orders, so that the two RDP figures must agree to rounding) and
by privacy-loss distributions (PLD, a tighter numerical bound).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from shared.privacy.accounting import Event, merge_events

# Opacus' default RDP orders (opacus.accountants.RDPAccountant.DEFAULT_ALPHAS).
OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning per RDP order it drops as unstable; the minimum over the rest stands."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dp_event(events: list[Event]) -> Any:
    import dp_accounting

    parts = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
        for sigma, rate, steps in merge_events(events)
        if steps > 0
    ]
    return dp_accounting.ComposedDpEvent(parts)


def rdp_epsilon(events: list[Event], *, delta: float) -> float:
    """dp-accounting's RDP epsilon at ``delta`` (Opacus' orders)."""
    from dp_accounting.rdp import RdpAccountant

    if not any(e[2] for e in events):
        return 0.0
    with _quiet_absl():
        accountant = RdpAccountant(orders=list(OPACUS_ORDERS))
        accountant.compose(_dp_event(events))
        return float(accountant.get_epsilon(delta))


def pld_epsilon(events: list[Event], *, delta: float, discretization: float = 1e-3) -> float:
    """dp-accounting's PLD epsilon at ``delta`` (pessimistic discretisation: an upper bound)."""
    from dp_accounting.pld import PLDAccountant

    if not any(e[2] for e in events):
        return 0.0
    with _quiet_absl():
        accountant = PLDAccountant(value_discretization_interval=discretization)
        accountant.compose(_dp_event(events))
        return float(accountant.get_epsilon(delta))
