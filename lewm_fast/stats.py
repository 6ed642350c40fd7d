"""The uncertainty of a success rate: the Wilson score interval, and how lewm_fast prints it.

Fifty evaluation episodes leave about +-7 points of binomial noise on a success rate, so
every success rate lewm_fast prints carries its 95% Wilson score interval::

    wilson_interval(40, 50)   # (0.6696..., 0.8876...)
    success_text(40, 50)      # '80.0% (40/50, 95% CI [67.0%, 88.8%])'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from . import _checks

__all__ = ["Z_95", "wilson_interval", "success_text", "spread"]

# The two-sided 95% standard normal quantile, rounded as usual; the exact 1.959964 (statsmodels'
# default) moves the bounds of a 50-episode interval by under 1e-5.
Z_95 = 1.96


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (lo, hi) of a binomial success probability, as fractions.

    Wilson (1927), "Probable inference, the law of succession, and statistical inference",
    JASA 22(158), 209-212: the probabilities p whose score test does not reject
    ``successes`` in ``trials`` at level z, i.e. the roots of
    ``(p_hat - p)^2 = z^2 p (1 - p) / n`` with ``p_hat = k / n``::

        centre = (k + z^2 / 2) / (n + z^2)
        half   = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)
        (lo, hi) = (centre - half, centre + half)

    Unlike the normal-approximation (Wald) interval it stays inside [0, 1] and is not
    empty at 0 or n successes: ``lo`` is exactly 0 when k = 0 and ``hi`` exactly 1 when
    k = n. With the default z = 1.96 it is the 95% interval (statsmodels'
    ``proportion_confint(k, n, method="wilson")`` to 5 decimals); e.g. 40 of 50 ->
    (0.6696, 0.8876), 0 of 50 -> (0, 0.0714), 50 of 50 -> (0.9286, 1).

    Args:
        successes: k, an integer in [0, trials] (numpy integers are accepted).
        trials: n, an integer >= 1.
        z: the standard normal quantile of the two-sided level, a positive finite number.

    Raises ValueError naming the argument for a count that is not such an integer, more
    successes than trials, or a z that is not positive and finite.
    """
    k = _checks.integer(successes, "successes", 0, numpy=True)
    n = _checks.integer(trials, "trials", 1, numpy=True)
    if k > n:
        raise ValueError(f"successes ({k}) must not exceed trials ({n})")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite number (1.96 for 95%), got {z!r}")
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def success_text(successes: int, trials: int) -> str:
    """A success count as lewm_fast prints it: ``'80.0% (40/50, 95% CI [67.0%, 88.8%])'``.

    The rate and the bounds of :func:`wilson_interval` (z = 1.96) in percent with one
    decimal. ValueError as for :func:`wilson_interval`.
    """
    lo, hi = wilson_interval(successes, trials)
    interval = f"95% CI [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    return f"{100 * successes / trials:.1f}% ({successes}/{trials}, {interval})"


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "std", "min", "max"}`` of a non-empty sequence of numbers.

    ``std`` is the sample standard deviation (divisor n - 1), None for a single value.
    ValueError for an empty sequence.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread needs at least one value, got an empty sequence")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }
