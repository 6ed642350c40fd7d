"""The Wilson score interval and how a success rate is printed (lewm_fast.stats)."""

import math

import numpy as np
import pytest

from lewm_fast.stats import Z_95, spread, success_text, wilson_interval

# (id, successes, trials, lo, hi): 95% Wilson bounds computed independently of the closed
# form, by bisecting the score-test boundary (p_hat - p)^2 = 1.96^2 p (1 - p) / n in
# 50-digit decimals; statsmodels' proportion_confint(k, n, method="wilson") agrees to 5
# decimals (it uses z = 1.959964): e.g. 40/50 -> (0.66963, 0.88756).
KNOWN = [
    ("40-of-50", 40, 50, 0.6696262789551476, 0.8875637005402611),
    ("0-of-50", 0, 50, 0.0, 0.07135003417431875),
    ("50-of-50", 50, 50, 0.9286499658256813, 1.0),
    ("8-of-20", 8, 20, 0.2188039674141927, 0.613422057684794),
    ("42-of-50", 42, 50, 0.7148551903823402, 0.9166267863791231),
    ("28-of-50", 28, 50, 0.42305786800143524, 0.6883801278976466),
    ("140-of-150", 140, 150, 0.8816364734751868, 0.9633885392651903),
    ("1-of-1", 1, 1, 0.20654329147389291, 1.0),
]


@pytest.mark.parametrize("k,n,lo,hi", [c[1:] for c in KNOWN], ids=[c[0] for c in KNOWN])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), rel=0, abs=1e-12)
    # each inner bound lies on the score-test boundary; 0 and 1 are exact at k = 0 and k = n
    p_hat = k / n
    for p in got:
        if 0 < p < 1:
            assert (p_hat - p) ** 2 == pytest.approx(Z_95**2 * p * (1 - p) / n, rel=1e-9)
    assert (got[0] == 0.0) == (k == 0) and (got[1] == 1.0) == (k == n)


def test_wilson_interval_contains_the_rate_and_narrows_with_trials():
    for k, n in ((1, 3), (7, 10), (35, 50), (700, 1000)):
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo < k / n < hi <= 1
    widths = [np.subtract(*wilson_interval(4 * m, 5 * m)[::-1]) for m in (10, 40, 160)]
    assert widths[0] > widths[1] > widths[2]
    # a wider level, a wider interval; numpy counts are accepted
    assert wilson_interval(np.int64(40), np.int64(50), z=2.576)[0] < wilson_interval(40, 50)[0]


def test_success_text():
    assert success_text(40, 50) == "80.0% (40/50, 95% CI [67.0%, 88.8%])"
    assert success_text(0, 50) == "0.0% (0/50, 95% CI [0.0%, 7.1%])"
    assert success_text(50, 50) == "100.0% (50/50, 95% CI [92.9%, 100.0%])"


def test_spread():
    assert spread([0.8, 0.76, 0.84]) == pytest.approx(
        {"mean": 0.8, "std": 0.04, "min": 0.76, "max": 0.84}, rel=1e-12
    )
    assert spread([0.5]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5}


BAD = [  # (id, args, kwargs, error match)
    ("negative-successes", (-1, 50), {}, "successes must be an integer >= 0"),
    ("zero-trials", (0, 0), {}, "trials must be an integer >= 1"),
    ("more-successes", (51, 50), {}, r"successes \(51\) must not exceed trials \(50\)"),
    ("float-count", (40.0, 50), {}, "successes must be an integer"),
    ("bool-count", (True, 50), {}, "successes must be an integer"),
    ("zero-z", (40, 50), {"z": 0.0}, "z must be a positive finite number"),
    ("nan-z", (40, 50), {"z": math.nan}, "z must be a positive finite number"),
]


@pytest.mark.parametrize("args,kwargs,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(*args, **kwargs)


def test_spread_refuses_nothing():
    with pytest.raises(ValueError, match="at least one value"):
        spread([])
