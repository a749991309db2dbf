"""Bootstrap 95% intervals for every rate and mean rtune reports.

Percentile bootstrap over items: resample the per-item values with replacement (a seeded numpy
generator, so a report is reproducible), take the mean of each resample, and report the 2.5th and
97.5th percentiles of those means. For a rate the values are 0/1 per item.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000


def bootstrap_ci(values, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """(low, high) of the mean of `values`; None with fewer than 2 values (no interval to speak of)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values, seed: int = 0) -> tuple[float | None, tuple[float, float] | None, int]:
    """(mean, interval, n) over the values that are not None."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None, 0
    return sum(x) / len(x), bootstrap_ci(x, seed=seed), len(x)
