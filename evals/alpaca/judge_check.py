"""The judge check: a judge measured on pairs whose better answer is known, before its win rates
are believed (:func:`check_judge`)."""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from evals.alpaca.judge import Judge, cache_path, cached_keys

# Corruptions whose answer is known to be worse than the reference answer.
CHECK_KINDS = ("truncated", "shuffled", "other_instruction")
TRUNCATE_SHARE = 0.3

_TIE_TOLERANCE = 1e-9


def _truncate(text: str, share: float = TRUNCATE_SHARE) -> str:
    """The text up to the end of its first ``share`` of words (at least one), formatting kept."""
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    keep = max(1, math.ceil(len(spans) * share))
    return text[: spans[keep - 1]]


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled)


def _corrupt(kind: str, record: dict[str, Any], pool: Sequence[dict[str, Any]], rng: random.Random) -> str:
    if kind == "truncated":
        return _truncate(record["output"])
    if kind == "shuffled":
        return _shuffle_words(record["output"], rng)
    if kind == "other_instruction":
        others = [r for r in pool if r["instruction"] != record["instruction"] and r["output"] != record["output"]]
        return rng.choice(others)["output"]
    raise ValueError(f"unknown corruption {kind!r}; known: {CHECK_KINDS}")


def _decision(p: float) -> float:
    """1 if p favours, 0.5 on a tie, 0 otherwise."""
    return 0.5 if abs(p - 0.5) <= _TIE_TOLERANCE else float(p > 0.5)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _check_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [r for r in rows if r["p_first"] is not None]
    by_pair: dict[int, list[dict[str, Any]]] = {}
    for r in judged:
        by_pair.setdefault(r["pair"], []).append(r)
    both = [v for v in by_pair.values() if len(v) == 2]
    consistent = [float(a["correct"] == b["correct"] and a["correct"] != 0.5) for a, b in both]
    return {
        "accuracy": _mean([r["correct"] for r in judged]),
        "mean_p_correct": _mean([r["p_correct"] for r in judged]),
        "position_bias": None if not judged else round(_mean([_decision(r["p_first"]) for r in judged]) - 0.5, 6),
        "mean_p_first_minus_half": None if not judged else round(_mean([r["p_first"] for r in judged]) - 0.5, 6),
        "order_consistency": _mean(consistent),
        "n_pairs": len(by_pair),
        "n_judgments": len(judged),
        "n_missing": len(rows) - len(judged),
    }


def check_judge(
    judge: Judge,
    reference_records: Sequence[dict[str, Any]],
    n: int = 20,
    seed: int = 0,
    *,
    min_accuracy: float = 0.75,
    kinds: Sequence[str] = CHECK_KINDS,
    out_dir: str | Path | None = None,
    min_words: int = 8,
) -> dict[str, Any]:
    """Measure a judge on pairs whose better answer is known, before trusting its win rates.

    For ``n`` reference records (drawn with ``seed`` among those of at least ``min_words``
    words), the real answer is paired with each corruption in ``kinds``: ``truncated`` (its first
    30% of words), ``shuffled`` (its words in random order; nearly the same length) and
    ``other_instruction`` (the answer of another instruction). Each pair is judged in both
    orders, with alpaca_eval's own order randomization off, through the same annotator that
    scoring uses.

    Definitions, over all judgments (a pair in one order): a judgment is correct (1) when it gives
    the real answer more than half the probability, a tie (0.5) when exactly half, wrong (0)
    otherwise. ``accuracy`` is the mean of that; ``mean_p_correct`` the mean probability given to
    the real answer. ``position_bias`` is the share of judgments that pick the first shown
    output (ties count half) minus 0.5: 0 is unbiased, +0.5 always picks the first, -0.5 always
    the second; since the real answer is first in exactly half the judgments, a perfect judge has
    0. ``order_consistency`` is the share of pairs on which both orders pick the same answer.

    Args:
        judge: the judge to check.
        reference_records: AlpacaEval records whose answers are taken as the good ones.
        n: how many reference records.
        seed: draws the records and the corruptions.
        min_accuracy: ``trusted`` is ``accuracy >= min_accuracy``.
        kinds: which corruptions.
        out_dir: caches the judgments there (``judge_cache/``); None: no cache.
        min_words: records with fewer words are not drawn (too short to corrupt).

    Returns:
        The numbers above overall and ``by_kind``, ``trusted``, ``seconds_per_judgment``, and the
        judge's provenance.
    """
    rng = random.Random(seed)
    pool = [r for r in reference_records if len(r["output"].split()) >= min_words]
    chosen = rng.sample(pool, min(n, len(pool)))
    rows = _planted_pairs(chosen, kinds, reference_records, rng)

    caching_path = cache_path(Path(out_dir), judge, "check") if out_dir is not None else None
    annotator = judge.annotator(caching_path, is_randomize_output_order=False)
    cached = cached_keys(annotator)
    judged_now = len({(r["instruction"], r["output_1"], r["output_2"]) for r in rows} - cached)
    start = time.perf_counter()
    annotated = annotator.annotate_pairs(pd.DataFrame(rows)[["instruction", "output_1", "output_2"]]) if rows else []
    seconds = time.perf_counter() - start
    _read_judgments(rows, annotated)
    masses = [a["preference_raw_completion"].get("choice_mass") for a in annotated
              if isinstance(a.get("preference_raw_completion"), dict)]

    summary = _check_summary(rows)
    by_kind = {kind: _check_summary([r for r in rows if r["kind"] == kind]) for kind in kinds}
    return {
        **summary,
        "trusted": summary["accuracy"] is not None and summary["accuracy"] >= min_accuracy,
        "min_accuracy": min_accuracy,
        "by_kind": by_kind,
        "mean_choice_mass": _mean([m for m in masses if m is not None]),
        "judged_now": judged_now,
        "seconds_per_judgment": round(seconds / judged_now, 4) if judged_now else None,
        "seed": seed,
        "n_records": len(chosen),
        "judge": judge.provenance(),
    }


def _planted_pairs(chosen: Sequence[dict[str, Any]], kinds: Sequence[str], pool: Sequence[dict[str, Any]],
                   rng: random.Random) -> list[dict[str, Any]]:
    """Each chosen record's answer against each corruption of it, in both orders: one row per
    judgment (``pair``, ``kind``, ``good_first``, ``instruction``, ``output_1``, ``output_2``)."""
    rows: list[dict[str, Any]] = []
    for record in chosen:
        for kind in kinds:
            bad = _corrupt(kind, record, pool, rng)
            if bad == record["output"]:
                continue
            pair = len(rows) // 2
            for good_first in (True, False):
                first, second = (record["output"], bad) if good_first else (bad, record["output"])
                rows.append({"pair": pair, "kind": kind, "good_first": good_first,
                             "instruction": record["instruction"], "output_1": first, "output_2": second})
    return rows


def _read_judgments(rows: list[dict[str, Any]], annotated: Sequence[dict[str, Any]]) -> None:
    """Adds ``p_first``, ``p_correct`` and ``correct`` to every row (None where not judged)."""
    preference = {(a["instruction"], a["output_1"], a["output_2"]): a.get("preference") for a in annotated}
    for r in rows:
        pref = preference.get((r["instruction"], r["output_1"], r["output_2"]))
        if pref is None or (isinstance(pref, float) and math.isnan(pref)):
            r.update(p_first=None, p_correct=None, correct=None)
            continue
        p_first = 2.0 - float(pref)  # alpaca_eval: 1 means output_1 preferred, 2 output_2
        p_correct = p_first if r["good_first"] else 1.0 - p_first
        r.update(p_first=p_first, p_correct=p_correct, correct=_decision(p_correct))
