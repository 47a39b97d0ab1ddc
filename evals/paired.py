"""Paired comparisons: two models scored on the same items, the mean difference, its interval,
and the smallest difference the comparison could have seen.

Every model the loop makes answers the same AlpacaEval prompts and the same held-out documents,
so a comparison between two of them is paired: per item, ``current - baseline``. The interval of
the mean difference is

- for 0/1 items (accuracy per document): the Agresti-Min interval for a difference of paired
  proportions (a Wald interval after adding half an item to each of the four agree/disagree
  cells), which keeps its coverage at a handful of items and never collapses to a point;
- for other items (fractions, preferences with ties, lengths): Student's t interval of the mean
  difference (scipy); where every item moved by exactly the same amount the t interval has no
  width, and the pseudo-item rule above is used instead, over the items' range when it is known.

Coverage of both rules was checked by simulation (``tests/test_paired.py`` keeps a short version:
at least 0.9 at a nominal 0.95 from 6 items up). The smallest detectable difference (MDE) is the
one a two-sided test at the same level finds with the given power, from the observed per-item
spread of the differences: ``(q(1 - alpha/2) + q(power)) * sd / sqrt(n)``, with ``q`` Student's t
quantiles (normal ones for 0/1 items, as the Agresti-Min interval uses); ``items_needed`` inverts it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats


NOISE = 1e-6
"""Per-item differences within this fraction of the items' range count as no change."""


class PairingError(ValueError):
    """The two sets of per-item scores are not over the same items."""


@dataclass(frozen=True)
class Paired:
    """The mean of per-item differences (current minus baseline), in the metric's own units."""

    n: int
    estimate: float
    low: float
    high: float
    level: float
    method: str
    """``agresti-min`` (0/1 items), ``t`` or ``pseudo-items`` (no spread among the differences)."""
    sd: float
    """The spread of the per-item differences the interval and the MDE use."""
    mde: float | None
    """The smallest true difference found with ``power`` at ``level`` (two-sided); None when
    there is no spread to plan from (every item the same on both models, range unknown)."""
    power: float
    p_value: float | None = None
    """Two-sided: McNemar's exact test for 0/1 items, the one-sample t test otherwise."""
    changed: int | None = None
    """Items whose score differs between the two models."""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def items_needed(self, effect: float) -> int | None:
        """Items needed for an MDE of ``effect`` at the same spread, level and power (None when
        ``effect`` is not positive or there is no spread to plan from)."""
        return items_needed(self.sd, effect, self.level, self.power, normal=self.method != "t")


def paired_difference(current: Mapping[Any, float], baseline: Mapping[Any, float], *, level: float = 0.95,
                      power: float = 0.8, bounds: tuple[float, float] | None = None) -> Paired:
    """``current - baseline`` over the items both hold, keyed alike (instruction, document id).

    Args:
        current, baseline: per-item scores of the two models.
        level: confidence level of the interval (already corrected for multiple comparisons).
        power: for the MDE.
        bounds: the range a single item's score can take (``(0, 1)`` for accuracy, ``(0, 100)``
            for a preference in percent); None when unbounded. It sets the pseudo-items' spread.

    Raises:
        PairingError: the two hold different items, or none.
    """
    if set(current) != set(baseline):
        only_cur, only_base = set(current) - set(baseline), set(baseline) - set(current)
        raise PairingError(f"the two evaluations are not over the same items: {len(only_cur)} only in this one, "
                           f"{len(only_base)} only in the baseline")
    if not current:
        raise PairingError("no items to compare")
    keys = sorted(current, key=repr)
    cur = np.array([float(current[k]) for k in keys])
    base = np.array([float(baseline[k]) for k in keys])
    ends = None if bounds is None else (float(bounds[0]), float(bounds[1]))
    binary = ends is not None and bool(np.isin(cur, ends).all() and np.isin(base, ends).all())
    half_range = None if ends is None else ends[1] - ends[0]
    result = mean_difference(cur - base, level=level, power=power, half_range=half_range, binary=binary)
    if binary:
        worse, better = int((cur < base).sum()), int((cur > base).sum())
        p = stats.binomtest(better, better + worse, 0.5).pvalue if better + worse else 1.0
        result = _replace(result, p_value=float(p))
    return result


def mean_difference(diffs: Sequence[float], *, level: float = 0.95, power: float = 0.8,
                    half_range: float | None = None, binary: bool = False) -> Paired:
    """The interval and MDE of the mean of per-item differences ``diffs``, which lie within
    ``[-half_range, half_range]`` (None: unbounded); ``binary``: they come from items scored
    only at the two ends of their range (0/1 items; ``half_range`` is then required)."""
    d = np.asarray(diffs, dtype=float)
    n = int(d.size)
    if n == 0:
        raise PairingError("no items to compare")
    # Differences at floating-point noise (the same answers rated twice through float arithmetic)
    # are no change: a t interval over them would claim a certainty nothing measured.
    scale = half_range if half_range is not None else float(np.abs(d).max(initial=0.0))
    d = np.where(np.abs(d) <= NOISE * max(scale, 1e-300), 0.0, d)
    changed = int((d != 0).sum())
    if binary:
        if half_range is None:
            raise ValueError("0/1 items need their range (half_range)")
        return _pseudo_items(d, half_range, level, power, "agresti-min", changed)
    if n >= 2 and np.ptp(d) > 0:
        sd = float(d.std(ddof=1))
        test = stats.ttest_1samp(d, 0.0)
        ci = test.confidence_interval(level)
        mde = _mde(sd, n, level, power, normal=False)
        low, high = float(ci.low), float(ci.high)
        if half_range is not None:
            low, high = max(low, -half_range), min(high, half_range)
        return Paired(n, float(d.mean()), low, high, level, "t", sd, mde, power, float(test.pvalue), changed)
    if half_range is not None:
        return _pseudo_items(d, half_range, level, power, "pseudo-items", changed)
    value = float(d.mean())
    return Paired(n, value, value, value, level, "t", 0.0, None, power, None, changed)


def _pseudo_items(d: np.ndarray, h: float, level: float, power: float, method: str, changed: int) -> Paired:
    """Half an item at each end of the range and one at no change (Agresti-Min for 0/1 items):
    mean and variance over ``n + 2`` items, a normal interval clipped to the range."""
    n2 = d.size + 2
    mean = float(d.sum() / n2)
    var = max(float((np.square(d).sum() + h * h) / n2) - mean * mean, 0.0)
    sd = math.sqrt(var)
    z = stats.norm.ppf(0.5 + level / 2)
    half = z * sd / math.sqrt(n2)
    return Paired(int(d.size), float(d.mean()), float(max(mean - half, -h)), float(min(mean + half, h)), level, method, sd,
                  _mde(sd, n2, level, power, normal=True), power, None, changed)


def _quantiles(n: int, level: float, power: float, normal: bool) -> float:
    if normal or n < 2:
        return float(stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power))
    return float(stats.t.ppf(0.5 + level / 2, n - 1) + stats.t.ppf(power, n - 1))


def _mde(sd: float, n: int, level: float, power: float, normal: bool) -> float | None:
    if sd <= 0 or n < 1:
        return None
    return _quantiles(n, level, power, normal) * sd / math.sqrt(n)


def items_needed(sd: float, effect: float, level: float, power: float, normal: bool = True) -> int | None:
    """The n at which the MDE of a mean difference with spread ``sd`` falls to ``effect``
    (normal quantiles, then refined with t quantiles at that n unless ``normal``)."""
    if effect <= 0 or sd <= 0:
        return None
    n = max(2, math.ceil((_quantiles(0, level, power, True) * sd / effect) ** 2))
    while not normal and _quantiles(n, level, power, False) * sd / math.sqrt(n) > effect:
        n += 1
    return n


def one_sample(values: Mapping[Any, float], null: float, *, level: float = 0.95, power: float = 0.8,
               bounds: tuple[float, float] | None = None) -> Paired:
    """The mean of ``values - null``: a head-to-head preference (in percent, 50 = no difference)
    is its own paired difference, the two models having answered each prompt."""
    d = np.array([float(values[k]) for k in sorted(values, key=repr)]) - null
    half = None if bounds is None else float(max(bounds[1] - null, null - bounds[0]))
    return mean_difference(d, level=level, power=power, half_range=half)


def unpaired(current: float, baseline: float, se_current: float | None, se_baseline: float | None, n: int | None,
             *, level: float = 0.95, power: float = 0.8) -> Paired:
    """``current - baseline`` from two summary numbers and their standard errors, as if
    independent (a normal interval): for metrics without per-item scores. Wider than the paired
    interval whenever the two models' item scores are positively correlated, as they are."""
    se = math.sqrt((se_current or 0.0) ** 2 + (se_baseline or 0.0) ** 2)
    z = float(stats.norm.ppf(0.5 + level / 2))
    diff = float(current - baseline)
    items = n or 1
    return Paired(items, diff, diff - z * se, diff + z * se, level, "unpaired", se * math.sqrt(items),
                  _quantiles(0, level, power, True) * se if se > 0 else None, power)


def corrected_level(level: float, comparisons: int) -> float:
    """Bonferroni: each of ``comparisons`` intervals at ``1 - (1 - level) / comparisons``, so that
    all hold together with probability at least ``level``."""
    return 1 - (1 - level) / max(comparisons, 1)


def _replace(p: Paired, **changes: Any) -> Paired:
    return Paired(**{**asdict(p), **changes})
