"""Epsilon recomputed without Opacus: by direct integration, and by Google's dp-accounting.

The project's own numbers come from Opacus' accountants. A privacy officer should
not have to trust one library's arithmetic, so the report recomputes every
partner's epsilon from its ledger's events three ways:

- **direct integration** (:func:`integrated_epsilon`): each step's Rényi
  divergence integrated numerically from its definition, on Opacus' orders, and
  converted to epsilon by the same bound. With the RDP accountant it must equal
  the ledger's figure to rounding;
- **dp-accounting's RDP** on the same orders. At integer orders it equals the
  integral. At fractional orders it sums the terms of the divergence's series
  by magnitude (its ``_compute_log_a_frac`` drops the signs of the binomial
  coefficients, which alternate past the order), an upper bound: its figure is
  higher where the best order is fractional (0.2 % on ``make demo``'s partners,
  best order 2.4), and it drops an order whose series of magnitudes does not
  converge in 1,000 terms. Both errors are on the safe side;
- **dp-accounting's PLD**, privacy-loss distributions: a tighter numerical bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

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


# --------------------------------------------------------------------------- direct integration

# Grid points per noise standard deviation: the integrand is analytic in a strip of half-width
# pi x sigma^2 about the real line, so the trapezoid rule's error falls like exp(-2 pi^2 x this x sigma).
POINTS_PER_SIGMA = 64


def integrated_rdp(*, noise_multiplier: float, sample_rate: float, order: float) -> float:
    """Rényi DP at ``order`` of one step of the Poisson-subsampled Gaussian mechanism, by
    numerical integration of its definition (Mironov, Talwar & Zhang, "Rényi Differential
    Privacy of the Sampled Gaussian Mechanism", 2019, Sec. 3):

        A = E_{z ~ N(0, s^2)} [ ((1 - q) + q exp((2z - 1) / (2 s^2)))^order ],   RDP = log(A) / (order - 1)

    for noise multiplier s and sample rate q (they show this direction of the divergence is the
    larger, and Opacus computes the same quantity by a series). The integrand is a mix of Gaussians centred between 0 and ``order``, each of
    width s, so a trapezoid rule on [-12 s - 1, order + 12 s + 1] in log space is exact to rounding.
    """
    s, q, a = float(noise_multiplier), float(sample_rate), float(order)
    if not (s > 0 and 0 < q <= 1 and a > 1):
        raise ValueError(f"expected noise multiplier > 0, 0 < sample rate <= 1 and order > 1; got {s}, {q}, {a}")
    step = s / POINTS_PER_SIGMA
    z = np.arange(-12 * s - 1, a + 12 * s + 1 + step, step)
    shift = (2 * z - 1) / (2 * s * s)  # log of the likelihood ratio N(1, s^2) / N(0, s^2) at z
    log_ratio = shift if q == 1 else np.logaddexp(math.log1p(-q), math.log(q) + shift)
    log_integrand = -z * z / (2 * s * s) - math.log(s * math.sqrt(2 * math.pi)) + a * log_ratio
    peak = float(log_integrand.max())
    log_a = peak + math.log(float(np.exp(log_integrand - peak).sum()) * step)
    return max(0.0, log_a) / (a - 1)


def integrated_epsilon(events: list[Event], *, delta: float, order: float | None = None) -> float:
    """Epsilon at ``delta`` of ``events`` by :func:`integrated_rdp`: RDP summed over the steps at each
    of Opacus' orders (or at ``order`` alone, as a privacy account counts), converted by
    the bound Opacus uses (Balle et al., "Hypothesis Testing Interpretations and Rényi Differential
    Privacy", AISTATS 2020, Theorem 21), and the least over the orders."""
    history = [e for e in merge_events(events) if e[2] > 0]
    if not history:
        return 0.0
    orders = (float(order),) if order is not None else OPACUS_ORDERS
    best = math.inf
    for a in orders:
        rdp = sum(steps * integrated_rdp(noise_multiplier=sigma, sample_rate=rate, order=a) for sigma, rate, steps in history)
        best = min(best, rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return max(0.0, best)


def integral_disagreement(integrated: float | None, *, recorded: float, accountant: str | None, recorded_by: str) -> str:
    """Empty, or why the integrated RDP epsilon does not back an RDP epsilon someone recorded (a ledger's,
    an account's): the two must be equal to rounding (1e-6 relative; measured over 200 random
    histories: within 4e-11). Another accountant's figure (PRV, GDP) is not RDP's, so it is not compared."""
    if integrated is None or accountant != "rdp" or abs(integrated - recorded) <= 1e-6 * max(1.0, abs(recorded)):
        return ""
    return f"DIFFERS from {recorded_by} {recorded:.6f}: Opacus' arithmetic and the RDP definition disagree"
