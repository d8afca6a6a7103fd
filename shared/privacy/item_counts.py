"""Item counts released with user-level DP: the Gaussian mechanism on a bounded histogram.

The popularity prior (``shared/model/recommender.py``) needs item counts, which
mix every user's data; DP training may use them only as a DP release.

Each user adds ``1 / sqrt(k)`` to each of the ``k`` distinct items among their
latest ``window`` training items: their contribution has L2 norm 1, whatever their history, so adding or removing
one user moves the histogram by at most 1 in L2 (the sensitivity). Gaussian noise
of standard deviation ``noise_multiplier`` on every item then makes the release
(epsilon, delta)-DP for users. In the accountant it is one step of the subsampled
Gaussian mechanism at sample rate 1: Opacus' RDP and PRV accountants compose it
with DP-SGD's steps exactly as they compose those steps with each other.

The noise is drawn in the form DP-SGD's is (Opacus' ``secure_mode`` noise, which the
partner's optimizer uses): each value the sum of four Gaussian draws, halved. One
floating-point Gaussian draw can reveal, through its rounding, the value it was added
to (Jin et al., IEEE S&P 2022); the sum of several resists that (Holohan & Braghin,
2021).

Why only the latest items: the items a model is tested on are each user's latest,
and popularity drifts. On amazon2014-office, counts over whole histories rank test
items worse than no prior at all, while counts over each user's last 1 to 3 items
help (docs/experiments.md, "What got Scientific over the target"). A short window also concentrates a user's
unit of sensitivity on few items, so each count carries more signal per unit of noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.privacy.accounting import Event, counts_release_event


def user_weighted_counts(sequences: Sequence[np.ndarray], *, n_items: int, window: int = 0) -> np.ndarray:
    """[N + 1] sum over users of 1 / sqrt(k) for each of the k distinct items among
    their last ``window`` items (0: their whole sequence); row 0 = padding, 0."""
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: whole sequences), got {window}")
    counts = np.zeros(n_items + 1, dtype=np.float64)
    for seq in sequences:
        items = np.unique(np.asarray(seq)[-window:] if window else np.asarray(seq))
        items = items[items > 0]
        if len(items):
            counts[items] += 1.0 / np.sqrt(len(items))
    return counts


def gaussian_noise(*, std: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size] Gaussian noise of standard deviation ``std``, each value the sum of four draws of
    standard deviation ``std`` halved (the floating-point-safe form; module docstring)."""
    draws = np.stack([rng.normal(0.0, std, size) for _ in range(4)])  # [4, size]
    return draws.sum(axis=0) / 2.0


def release_item_counts(
    sequences: Sequence[np.ndarray], *, n_items: int, window: int = 0, noise_multiplier: float, rng: np.random.Generator
) -> tuple[np.ndarray, Event]:
    """Noisy counts [N + 1] (clipped at 0, row 0 = 0) and the accountant event that pays for them."""
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0 for a DP release, got {noise_multiplier}")
    exact = user_weighted_counts(sequences, n_items=n_items, window=window)
    noisy = exact + gaussian_noise(std=noise_multiplier, size=exact.size, rng=rng)
    noisy[0] = 0.0
    return np.clip(noisy, 0.0, None), counts_release_event(noise_multiplier)
