"""Confidence intervals for calibration numbers: percentile bootstrap over items (scipy).

Items are answer pairs (or prompts); every interval resamples them with a fixed seed, so the
same judgments always give the same interval. Values may be 0/1, halves (ties) or fractions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def _interval(result) -> tuple[float, float]:
    low, high = result.confidence_interval
    return round(float(low), 4), round(float(high), 4)


def mean_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean (None for fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    if np.all(x == x[0]):
        return round(float(x[0]), 4), round(float(x[0]), 4)
    res = stats.bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                          vectorized=True, axis=-1, rng=np.random.default_rng(seed))
    return _interval(res)


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, float | None]:
    """Mean of ``a - b`` over the same items, with its 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths: {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    interval = mean_interval(diff, seed)
    return {"mean": round(float(diff.mean()), 4) if diff.size else None,
            "low": interval[0] if interval else None, "high": interval[1] if interval else None}


def statistic_interval(n_items: int, statistic: Callable[[np.ndarray], float], seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of ``statistic(indices)`` over resampled item indices,
    for statistics that are not a mean of per-item values (a rank correlation across groups)."""
    if n_items < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(RESAMPLES)])
    values = values[np.isfinite(values)]
    if values.size < RESAMPLES // 2:
        return None
    alpha = (1 - CONFIDENCE) / 2
    return round(float(np.quantile(values, alpha)), 4), round(float(np.quantile(values, 1 - alpha)), 4)


def with_interval(values: Sequence[float], seed: int = 0) -> dict[str, float | int | None]:
    """``{"value", "low", "high", "n"}`` for the mean of ``values``."""
    interval = mean_interval(values, seed)
    return {"value": round(float(np.mean(values)), 4) if len(values) else None,
            "low": interval[0] if interval else None, "high": interval[1] if interval else None, "n": len(values)}
