"""95% intervals for every number rtune reports, each fitted to its statistic and named in the result.

    rate of 0/1 items          Wilson score interval (`wilson_ci`): exact-enough coverage at the
                               small sizes rtune reports (16-100 items) and never [0, 0] for 0 of n,
                               where a percentile bootstrap collapses to a point and under-covers.
    mean of per-item values    percentile bootstrap over items (`bootstrap_ci`; seeded, 2,000
                               resamples). Used for means (NLL, length, relevance) and for shares that
                               are not 0/1 per item (a soft win rate with ties counted as 1/2).
    paired difference          A minus B on the same items (`paired_difference`): Newcombe's hybrid
                               score interval for paired 0/1 rates (method 10 of Newcombe 1998,
                               Stat. Med. 17:2635), a paired percentile bootstrap (items resampled
                               jointly) for other values.

`rate_with_ci` and `mean_with_ci` return (value, interval, n); `CI_METHODS` holds the names a
metric's "ci_method" field carries, so a report can say how each interval was made.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile

WILSON = "Wilson score, 95%"
BOOTSTRAP = f"percentile bootstrap over items, 95%, {RESAMPLES} resamples"
NEWCOMBE_PAIRED = "Newcombe paired score (method 10), 95%"
BOOTSTRAP_PAIRED = f"paired percentile bootstrap over items, 95%, {RESAMPLES} resamples"
CI_METHODS = (WILSON, BOOTSTRAP, NEWCOMBE_PAIRED, BOOTSTRAP_PAIRED)


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion successes / n; None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Exact ends at 0 and n (the formula gives them up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _is_binary(values) -> bool:
    return all(v in (0, 1) for v in values)


def rate_with_ci(values) -> tuple[float | None, tuple[float, float] | None, int]:
    """(share, Wilson interval, n) of 0/1 values (bools count); None values are left out."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None, 0
    if not _is_binary(x):
        raise ValueError("rate_with_ci takes 0/1 values; use mean_with_ci for other shares")
    k = int(sum(x))
    return k / len(x), wilson_ci(k, len(x)), len(x)


def bootstrap_ci(values, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """(low, high) percentile-bootstrap interval of the mean of `values`; None with fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values, seed: int = 0) -> tuple[float | None, tuple[float, float] | None, int]:
    """(mean, bootstrap interval, n) over the values that are not None."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None, 0
    return sum(x) / len(x), bootstrap_ci(x, seed=seed), len(x)


def newcombe_paired_ci(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float] | None:
    """Newcombe's method 10 interval for p1 - p2 from a paired 2x2 table.

    a: both 1; b: first 1, second 0; c: first 0, second 1; d: both 0. p1 = (a+b)/n, p2 = (a+c)/n.
    The Wilson intervals of p1 and p2 are combined with the correlation phi of the pairs."""
    n = a + b + c + d
    if n == 0:
        return None
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_ci(a + b, n, z)
    l2, u2 = wilson_ci(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, diff - lower), min(1.0, diff + upper)


def paired_difference(first, second, seed: int = 0, binary: bool | None = None) -> dict | None:
    """Mean of first - second over items where both are present, with the interval fitted to the values.

    Returns {"value", "ci", "n", "ci_method"}, or None when no item has both values. A 0/1 statistic
    gets Newcombe's paired interval, anything else a paired bootstrap. binary: whether the statistic
    is 0/1 (a score that happens to be 0 on every item is not); None: judged from the values."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} values against {len(second)}: pairs need the same items")
    pairs = [(float(x), float(y)) for x, y in zip(first, second) if x is not None and y is not None]
    if not pairs:
        return None
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    value = float(np.mean(x - y))
    if binary is None:
        binary = _is_binary(x.tolist()) and _is_binary(y.tolist())
    elif binary and not (_is_binary(x.tolist()) and _is_binary(y.tolist())):
        raise ValueError("binary=True needs 0/1 values")
    if binary:
        a = int(np.sum((x == 1) & (y == 1)))
        b = int(np.sum((x == 1) & (y == 0)))
        c = int(np.sum((x == 0) & (y == 1)))
        d = int(np.sum((x == 0) & (y == 0)))
        return {"value": value, "ci": newcombe_paired_ci(a, b, c, d), "n": len(pairs), "ci_method": NEWCOMBE_PAIRED,
                "discordant": [b, c]}
    ci = bootstrap_ci((x - y).tolist(), seed=seed)  # resampling the differences resamples the items jointly
    return {"value": value, "ci": ci, "n": len(pairs), "ci_method": BOOTSTRAP_PAIRED}


def estimate(values, kind: str, seed: int = 0) -> tuple[float | None, tuple[float, float] | None, int, str | None]:
    """(value, interval, n, ci method) of per-item values: Wilson for a rate of 0/1 items, else bootstrap.

    kind "rate" with values that are not all 0/1 (per-item shares) takes the bootstrap too."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None, 0, None
    if kind == "rate" and _is_binary(x):
        value, ci, n = rate_with_ci(x)
        return value, ci, n, WILSON
    value, ci, n = mean_with_ci(x, seed=seed)
    return value, ci, n, BOOTSTRAP if ci is not None else None
