"""Intervals fitted to their statistic: Wilson for rates, bootstrap for means, Newcombe for paired rates."""

import math

import numpy as np
import pytest

from rtune.eval.metrics.intervals import (
    BOOTSTRAP,
    BOOTSTRAP_PAIRED,
    NEWCOMBE_PAIRED,
    WILSON,
    bootstrap_ci,
    estimate,
    newcombe_paired_ci,
    paired_difference,
    rate_with_ci,
    wilson_ci,
)


def test_wilson_matches_the_formula_and_never_collapses_at_zero():
    low, high = wilson_ci(0, 16)
    assert low == 0.0 and high == pytest.approx(0.1936, abs=1e-4)  # a percentile bootstrap gives [0, 0]
    assert bootstrap_ci([0.0] * 16) == (0.0, 0.0)
    low, high = wilson_ci(16, 16)
    assert high == 1.0 and low == pytest.approx(1 - 0.1936, abs=1e-4)
    # The textbook value for 8 of 16.
    z = 1.959963984540054
    centre, half = (0.5 + z * z / 32) / (1 + z * z / 16), z * math.sqrt(0.25 / 16 + z * z / 1024) / (1 + z * z / 16)
    assert wilson_ci(8, 16) == pytest.approx((centre - half, centre + half))
    assert wilson_ci(0, 0) is None
    with pytest.raises(ValueError):
        wilson_ci(5, 4)


def _coverage(interval, truth, draws) -> float:
    return float(np.mean([interval(d)[0] <= truth <= interval(d)[1] for d in draws]))


def test_wilson_covers_at_the_sizes_rtune_reports_where_the_bootstrap_does_not():
    rng = np.random.default_rng(0)
    p, n = 0.08, 16
    draws = [rng.random(n) < p for _ in range(3000)]
    wilson = _coverage(lambda d: wilson_ci(int(d.sum()), n), p, draws)
    boot = _coverage(lambda d: bootstrap_ci(d.astype(float).tolist(), resamples=400) or (0, 0), p, draws)
    assert wilson >= 0.93 and boot < 0.85  # the percentile bootstrap misses every 0-of-16 sample


def test_newcombe_paired_interval_covers_the_difference():
    rng = np.random.default_rng(1)
    cells = (0.3, 0.2, 0.05, 0.45)  # both, first only, second only, neither
    truth = cells[1] - cells[2]
    draws = [rng.multinomial(24, cells) for _ in range(3000)]
    cover = _coverage(lambda c: newcombe_paired_ci(*c), truth, draws)
    assert 0.93 <= cover <= 0.98
    low, high = newcombe_paired_ci(0, 0, 0, 10)
    assert low <= 0 <= high  # no discordant pairs: an interval around 0, not a point


def test_paired_difference_chooses_its_interval_by_the_values():
    a, b = [1, 1, 0, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 1, 0, 1]
    d = paired_difference(a, b)
    assert d["value"] == pytest.approx(3 / 8) and d["ci_method"] == NEWCOMBE_PAIRED and d["discordant"] == [3, 0]
    assert d["ci"][0] < d["value"] < d["ci"][1]
    m = paired_difference([2.0, 3.0, None, 4.5], [1.0, 3.5, 2.0, 4.0])
    assert m["n"] == 3 and m["value"] == pytest.approx((1.0 - 0.5 + 0.5) / 3) and m["ci_method"] == BOOTSTRAP_PAIRED
    assert paired_difference([None], [1.0]) is None
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_pairing_narrows_the_interval_of_correlated_values():
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    a, b = base + 0.3, base + rng.normal(scale=0.1, size=40)
    paired = paired_difference(a.tolist(), b.tolist())
    separate = [bootstrap_ci(a.tolist()), bootstrap_ci(b.tolist())]
    assert paired["ci"][1] - paired["ci"][0] < 0.5 * (separate[0][1] - separate[0][0])
    assert paired["ci"][0] > 0  # the shift of 0.3 is visible once paired


def test_estimate_names_its_method():
    assert estimate([True, False, True], "rate")[3] == WILSON
    assert estimate([0.2, 0.4, 0.9], "rate")[3] == BOOTSTRAP  # per-item shares are means
    assert estimate([1.0, 2.0], "mean")[3] == BOOTSTRAP
    assert estimate([None], "rate") == (None, None, 0, None)
    assert rate_with_ci([1, 0, None, 1])[2] == 3
    with pytest.raises(ValueError):
        rate_with_ci([0.5])


def test_a_score_that_is_zero_everywhere_is_not_a_rate():
    """ROUGE-L of 0 on every item looks like 0/1 values; its kind, not its values, picks the interval."""
    d = paired_difference([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], binary=False)
    assert d["ci_method"] == BOOTSTRAP_PAIRED and d["ci"] == (0.0, 0.0)
    assert paired_difference([0.0] * 3, [0.0] * 3)["ci_method"] == NEWCOMBE_PAIRED  # unknown kind: from values
    with pytest.raises(ValueError):
        paired_difference([0.5], [1.0], binary=True)
