"""What a judge's two judgments per labelled pair say about it: accuracy, order consistency,
position and length bias, each with a bootstrap interval over pairs.

A judgment is the probability ``p_first`` that the output shown first is the better one. Each
pair is judged twice, as stored (``output_1`` first) and swapped. Definitions:

* ``accuracy``: per pair, the probability given to the labelled-better output averaged over the
  two orders; the pair counts 1 when that average is above one half, 0.5 at exactly one half,
  0 below. This is the number a judge that averages both orders (as the harness's win rates
  do) gets right.
* ``single_order_accuracy``: the same per judgment, without averaging (what a judge shown one
  order would score).
* ``order_consistency``: the share of pairs whose two judgments pick the same output.
* ``position_bias``: the share of judgments picking the output shown first (ties half) minus
  one half: +0.5 always picks the first, -0.5 always the second.
* ``length_bias``: among pairs whose outputs differ in length, the share where the judge (both
  orders averaged) picks the longer output, minus the share where the label says the longer is
  better: 0 is a judge that favours length exactly as often as the labels do.
"""

from __future__ import annotations

from typing import Any, Sequence

from evals.calibration.intervals import paired_difference, with_interval
from evals.calibration.pairs import LabelledPair

_TIE = 1e-9


def decision(p: float) -> float:
    """1 above one half, 0.5 at one half, 0 below."""
    return 0.5 if abs(p - 0.5) <= _TIE else float(p > 0.5)


def pair_outcomes(pair: LabelledPair, p_first_stored: float, p_first_swapped: float) -> dict[str, float | None]:
    """Per-pair quantities behind the metrics (see the module docstring)."""
    q_stored = p_first_stored  # P(output_1 better), output_1 shown first
    q_swapped = 1.0 - p_first_swapped  # P(output_1 better), output_1 shown second
    correct_stored = q_stored if pair.label == 1 else 1.0 - q_stored
    correct_swapped = q_swapped if pair.label == 1 else 1.0 - q_swapped
    averaged = (correct_stored + correct_swapped) / 2
    d_stored, d_swapped = decision(q_stored), decision(q_swapped)
    longer = None
    if len(pair.output_1) != len(pair.output_2):
        longer = 1 if len(pair.output_1) > len(pair.output_2) else 2
    p1_avg = (q_stored + q_swapped) / 2
    return {
        "correct": decision(averaged),
        "p_correct": averaged,
        "correct_stored": decision(correct_stored),
        "correct_swapped": decision(correct_swapped),
        "consistent": float(d_stored == d_swapped and d_stored != 0.5),
        "first_stored": decision(p_first_stored),
        "first_swapped": decision(p_first_swapped),
        "picks_longer": None if longer is None else decision(p1_avg if longer == 1 else 1.0 - p1_avg),
        "label_longer": None if longer is None else float(pair.label == longer),
    }


def summarize(outcomes: Sequence[dict[str, float | None]], n_missing: int = 0, seed: int = 0) -> dict[str, Any]:
    """The metrics of one judge over one group of pairs."""
    n = len(outcomes)
    single = [o["correct_stored"] for o in outcomes] + [o["correct_swapped"] for o in outcomes]
    first = [o["first_stored"] for o in outcomes] + [o["first_swapped"] for o in outcomes]
    sized = [o for o in outcomes if o["picks_longer"] is not None]
    position = with_interval(first, seed)
    if position["value"] is not None:
        position = {k: (round(v - 0.5, 4) if k != "n" and v is not None else v) for k, v in position.items()}
    picks = [o["picks_longer"] for o in sized]
    labels = [o["label_longer"] for o in sized]
    length = paired_difference(picks, labels, seed) if sized else {"mean": None, "low": None, "high": None}
    return {
        "n_pairs": n,
        "n_missing": n_missing,
        "accuracy": with_interval([o["correct"] for o in outcomes], seed),
        "mean_p_correct": round(sum(o["p_correct"] for o in outcomes) / n, 4) if n else None,
        "single_order_accuracy": with_interval(single, seed),
        "order_consistency": with_interval([o["consistent"] for o in outcomes], seed),
        "position_bias": position,
        "picks_longer": round(sum(picks) / len(picks), 4) if picks else None,
        "label_longer": round(sum(labels) / len(labels), 4) if labels else None,
        "length_bias": {"value": length["mean"], "low": length["low"], "high": length["high"], "n": len(sized)},
    }


def versus(judge: Sequence[dict[str, float | None]], other: Sequence[dict[str, float | None]],
           seed: int = 0) -> dict[str, float | None]:
    """Paired difference in accuracy (judge minus other) over the same pairs, with its interval."""
    return paired_difference([o["correct"] for o in judge], [o["correct"] for o in other], seed)

