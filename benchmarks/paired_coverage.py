"""Coverage of the gate's paired intervals (evals.paired), by simulation: the table in
docs/paired-gates.md.

For each kind of item and each n, many simulated comparisons with a known true mean difference;
the share of intervals that hold it. "t alone" is Student's t without the pseudo-item rule (a
zero-width interval counts as a miss), for contrast.

Run as: python -m benchmarks.paired_coverage [--reps 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from evals.paired import mean_difference, one_sample, paired_difference

BINARY = ((0.3, 0.3, 0.5), (0.8, 0.5, 0.9), (0.1, 0.1, 0.2))
"""(base rate, rate of the items that change, share of items that keep the base's outcome)."""
TIES = ((0.2, 0.6, 0.2), (0.7, 0.2, 0.1), (0.05, 0.1, 0.85), (0.1, 0.8, 0.1))
"""Probabilities of a head-to-head preference of 0, 50 and 100."""
BETA = ((5, 5), (2, 8), (20, 20))
SIZES = (4, 6, 10, 30, 100)


def _t_alone(d: np.ndarray, truth: float) -> bool:
    if np.ptp(d) == 0:
        return False
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    return ci.low <= truth <= ci.high


def binary(rng, n: int, setting, reps: int) -> tuple[float, float]:
    base_rate, new_rate, keep = setting
    truth = keep * base_rate + (1 - keep) * new_rate - base_rate
    ours = alone = 0
    for _ in range(reps):
        base = (rng.random(n) < base_rate).astype(float)
        cur = np.where(rng.random(n) < keep, base, (rng.random(n) < new_rate).astype(float))
        p = paired_difference(dict(enumerate(cur)), dict(enumerate(base)), bounds=(0, 1))
        ours += p.low <= truth <= p.high
        alone += _t_alone(cur - base, truth)
    return ours / reps, alone / reps


def ties(rng, n: int, probs, reps: int) -> tuple[float, float]:
    truth = 50 * probs[1] + 100 * probs[2] - 50
    ours = alone = 0
    for _ in range(reps):
        values = rng.choice([0.0, 50.0, 100.0], n, p=probs)
        p = one_sample(dict(enumerate(values)), 50.0, bounds=(0, 100))
        ours += p.low <= truth <= p.high
        alone += _t_alone(values - 50.0, truth)
    return ours / reps, alone / reps


def continuous(rng, n: int, ab, reps: int) -> float:
    a, b = ab
    truth = a / (a + b)
    hits = 0
    for _ in range(reps):
        p = mean_difference(rng.beta(a, b, n))
        hits += p.low <= truth <= p.high
    return hits / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| items | binary, ours | binary, t alone | ties, ours | ties, t alone | continuous, t |")
    print("|---:|---|---|---|---|---|")
    for n in SIZES:
        b = [binary(rng, n, s, args.reps) for s in BINARY]
        t = [ties(rng, n, s, args.reps) for s in TIES]
        c = [continuous(rng, n, s, args.reps) for s in BETA] if n >= 6 else []
        cells = [", ".join(f"{x[i]:.3f}" for x in b) for i in (0, 1)]
        cells += [", ".join(f"{x[i]:.3f}" for x in t) for i in (0, 1)]
        cells.append(", ".join(f"{x:.3f}" for x in c) or "-")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
