"""The curator measured against outside labels.

The curator rates answers one at a time on the paper's rubric (as it rates candidates). Given a
labelled pair, it rates each of the two answers separately; it gets the pair right when the
labelled-better answer scores higher (a tie counts half; a pair with an unscored answer is left
out and counted). Beside it, on the same pairs: ``longer`` (rates an answer by its length in
characters) and ``chance`` (a seeded random rating).

Across models. On the AlpacaEval pairs, each of the five models' answers is rated, and the
models' mean ratings are rank-correlated (Spearman) with GPT-4's win rates against
text_davinci_003 over all 805 prompts; the interval resamples prompts.

A threshold from the labels. ``suggested_k`` is the rating threshold that best separates the
labelled-better answers from the labelled-worse ones on the human-labelled pairs (the largest
true-positive rate minus false-positive rate, "keep if rating >= k"): a threshold set from
outside labels rather than from the distribution of the curator's own scores.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from evals.calibration.intervals import paired_difference, statistic_interval, with_interval
from evals.calibration.pairs import GPT4_MODELS, LabelledPair, group_pairs, load_alpaca_gpt4

Rater = Callable[[list[dict[str, str]]], list[float | None]]
"""Rates ``[{"instruction", "response"}, ...]``; None where a rating did not parse."""
TRIVIAL_RATERS = ("longer", "chance")


def _items(pairs: Sequence[LabelledPair]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for p in pairs:
        seen.setdefault((p.instruction, p.output_1))
        seen.setdefault((p.instruction, p.output_2))
    return list(seen)


def trivial_ratings(name: str, items: Sequence[tuple[str, str]], seed: int = 0) -> dict[tuple[str, str], float]:
    if name == "longer":
        return {item: float(len(item[1])) for item in items}
    if name == "chance":
        return {item: random.Random(f"{seed}:{item[0]}:{item[1]}").random() for item in items}
    raise ValueError(f"unknown trivial rater {name!r}; known: {TRIVIAL_RATERS}")


def _pairwise(pairs: Sequence[LabelledPair], ratings: dict[tuple[str, str], float | None]) -> list[float | None]:
    out = []
    for p in pairs:
        good, bad = ratings.get((p.instruction, p.better)), ratings.get((p.instruction, p.worse))
        out.append(None if good is None or bad is None else (0.5 if good == bad else float(good > bad)))
    return out


def suggested_threshold(pairs: Sequence[LabelledPair], ratings: dict[tuple[str, str], float | None]
                        ) -> dict[str, float | None]:
    """The k that maximizes TPR - FPR for "keep if rating >= k", better answers as positives."""
    good = [ratings.get((p.instruction, p.better)) for p in pairs]
    bad = [ratings.get((p.instruction, p.worse)) for p in pairs]
    good = [g for g in good if g is not None]
    bad = [b for b in bad if b is not None]
    if not good or not bad:
        return {"k": None, "youden_j": None, "tpr": None, "fpr": None}
    best = None
    for k in sorted(set(good) | set(bad)):
        tpr = sum(g >= k for g in good) / len(good)
        fpr = sum(b >= k for b in bad) / len(bad)
        if best is None or tpr - fpr > best[0] + 1e-12:
            best = (tpr - fpr, k, tpr, fpr)
    return {"k": round(best[1], 4), "youden_j": round(best[0], 4), "tpr": round(best[2], 4), "fpr": round(best[3], 4)}


def rank_correlation(pairs: Sequence[LabelledPair], ratings: dict[tuple[str, str], float | None],
                     gpt4_win_rates: dict[str, float], seed: int = 0) -> dict[str, Any] | None:
    """Spearman, across models, of the mean rating of each model's answers against GPT-4's win rate."""
    alpaca = [p for p in pairs if p.model is not None]
    models = [m for m in GPT4_MODELS if any(p.model == m for p in alpaca)]
    if len(models) < 3:
        return None
    prompts = sorted({p.pair_id.rsplit(":", 1)[1] for p in alpaca}, key=int)
    index = {pid: i for i, pid in enumerate(prompts)}
    table = np.full((len(prompts), len(models)), np.nan)
    for p in alpaca:
        r = ratings.get((p.instruction, p.output_2))
        if r is not None:
            table[index[p.pair_id.rsplit(":", 1)[1]], models.index(p.model)] = r
    target = np.array([gpt4_win_rates[m] for m in models])

    def spearman(rows: np.ndarray) -> float:
        means = np.nanmean(table[rows], axis=0)
        if np.any(np.isnan(means)) or np.ptp(means) == 0:
            return float("nan")
        return float(stats.spearmanr(means, target).statistic)

    with warnings.catch_warnings():  # resamples missing a model give all-NaN columns; spearman() skips them
        warnings.simplefilter("ignore", RuntimeWarning)
        value = spearman(np.arange(len(prompts)))
        interval = statistic_interval(len(prompts), spearman, seed)
        means = np.nanmean(table, axis=0)
    return {"spearman": {"value": None if np.isnan(value) else round(value, 4),
                         "low": interval[0] if interval else None, "high": interval[1] if interval else None},
            "models": {m: (round(float(target[i]), 4), None if np.isnan(means[i]) else round(float(means[i]), 4))
                       for i, m in enumerate(models)},
            "prompts": len(prompts)}


def gpt4_win_rates(data_dir: str) -> dict[str, float]:
    """Each model's share of decided GPT-4 judgments won against text_davinci_003, all 805 prompts."""
    pairs, _ = load_alpaca_gpt4(data_dir)
    out = {}
    for m in GPT4_MODELS:
        mine = [p.label for p in pairs if p.model == m]
        out[m] = sum(label == 2 for label in mine) / len(mine)
    return out


def evaluate_curator(rate: Rater, pairs: Sequence[LabelledPair], *, subject: str = "curator", seed: int = 0,
                     data_dir: str = "packaged") -> dict[str, Any]:
    """The curator and the trivial raters on ``pairs``; see the module docstring."""
    items = _items(pairs)
    scores = rate([{"instruction": i, "response": r} for i, r in items])
    if len(scores) != len(items):
        raise ValueError(f"the rater returned {len(scores)} ratings for {len(items)} answers")
    ratings = {subject: dict(zip(items, scores)), **{n: trivial_ratings(n, items, seed) for n in TRIVIAL_RATERS}}
    groups = {}
    for group, members in group_pairs(pairs).items():
        mine = _pairwise(members, ratings[subject])
        kept = [i for i, v in enumerate(mine) if v is not None]
        row: dict[str, Any] = {"raters": {}, "vs": {}}
        for name, rated in ratings.items():
            outcomes = _pairwise(members, rated)
            values = [outcomes[i] for i in kept]
            row["raters"][name] = {"n_pairs": len(values), "accuracy": with_interval(values, seed),
                                   "unscored": len(members) - len(kept)}
            if name != subject:
                row["vs"][name] = paired_difference([mine[i] for i in kept], values, seed)
        groups[group] = row
    human = [p for p in pairs if p.labeller == "human"]
    rated = [s for s in scores if s is not None]
    return {
        "subject": subject,
        "groups": groups,
        "rank_correlation": rank_correlation(pairs, ratings[subject], gpt4_win_rates(data_dir), seed)
        if any(p.model for p in pairs) else None,
        "suggested_k": suggested_threshold(human, ratings[subject]),
        "answers_rated": len(items),
        "unscored": len(items) - len(rated),
        "mean_rating": round(sum(rated) / len(rated), 4) if rated else None,
        "seed": seed,
    }


def item_rows(pairs: Sequence[LabelledPair], scores: dict[tuple[str, str], float | None]) -> list[dict[str, Any]]:
    """Per pair, the two ratings and the label, for inspection."""
    return [{"pair_id": p.pair_id, "label": p.label, "rating_1": scores.get((p.instruction, p.output_1)),
             "rating_2": scores.get((p.instruction, p.output_2))} for p in pairs]
