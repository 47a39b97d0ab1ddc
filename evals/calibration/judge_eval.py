"""A judge measured against labels nobody in this project wrote (``humpback judge-eval``).

:func:`evaluate_judge` has a judge (any :class:`~evals.alpaca.judge.Judge`: our local-model
configs or alpaca_eval's own) judge every labelled pair in both orders, through the same
alpaca_eval annotator that scores win rates, and sets beside it, on the same pairs, three
trivial judges: ``longer`` (the output with more characters; a tie is half), ``first`` (always
the output shown first) and ``chance`` (a seeded coin per judgment). Metrics and their intervals
are defined in :mod:`evals.calibration.judge_metrics`.

The verdict. A judge is ``trusted`` when, on the human-labelled pairs, its accuracy beats the
``longer`` judge's by more than ``margin`` with the whole 95% interval of the paired difference
(the same pairs, judge minus longer) above ``margin``, and the interval of its own accuracy lies
above one half. Always-longer is the bar because it is free and, on these sets, far better than
chance; a judge that cannot beat it adds nothing but cost. The verdict says which test failed.

Caching. Judgments are cached in one alpaca_eval cache file per judge identity (its config
files, weights and dtype) under ``<cache>/judge_eval/``, so a second evaluation of the same
judge (by the command or by any run's calibration stage) judges nothing again.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from evals.alpaca.judge import Judge, cache_path, cached_keys
from evals.alpaca.judge_view import judge_view
from evals.calibration.judge_metrics import pair_outcomes, summarize, versus
from evals.calibration.pairs import HUMAN_SOURCES, LabelledPair, group_pairs

TRIVIAL_JUDGES = ("longer", "first", "chance")
ORDERS = ("stored", "swapped")


def _shown(pair: LabelledPair, order: str) -> tuple[str, str]:
    return (pair.output_1, pair.output_2) if order == "stored" else (pair.output_2, pair.output_1)


def trivial_judgments(name: str, pairs: Sequence[LabelledPair], seed: int = 0) -> dict[str, dict[str, float]]:
    """``{pair_id: {order: p_first}}`` of a trivial judge."""
    out: dict[str, dict[str, float]] = {}
    for pair in pairs:
        out[pair.pair_id] = {}
        for order in ORDERS:
            first, second = _shown(pair, order)
            if name == "longer":
                p = 0.5 if len(first) == len(second) else float(len(first) > len(second))
            elif name == "first":
                p = 1.0
            elif name == "chance":
                p = float(random.Random(f"{seed}:{pair.pair_id}:{order}").random() < 0.5)
            else:
                raise ValueError(f"unknown trivial judge {name!r}; known: {TRIVIAL_JUDGES}")
            out[pair.pair_id][order] = p
    return out


def model_judgments(judge: Judge, pairs: Sequence[LabelledPair], cache_dir: Path | None
                    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """``{pair_id: {order: p_first}}`` from the judge (unparsed judgments left out), and timing.

    A symmetric judge (:meth:`Judge.is_symmetric`: the order cannot change its preference) is
    asked in the stored order only; its swapped judgment is the mirror image, ``1 - p_first``."""
    symmetric = judge.is_symmetric()
    orders = ORDERS[:1] if symmetric else ORDERS
    rows = []
    for pair in pairs:
        for order in orders:
            # the same view of each answer that evaluation shows the judge (evals/alpaca/judge_view.py)
            first, second = (judge_view(pair.instruction, text).text for text in _shown(pair, order))
            rows.append({"pair_id": pair.pair_id, "order": order, "instruction": pair.instruction,
                         "output_1": first, "output_2": second})
    caching_path = cache_path(cache_dir, judge, "calibration") if cache_dir is not None else None
    annotator = judge.annotator(caching_path, is_randomize_output_order=False)
    keys = {(r["instruction"], r["output_1"], r["output_2"]) for r in rows}
    judged_now = len(keys - cached_keys(annotator))
    start = time.perf_counter()
    annotated = annotator.annotate_pairs(pd.DataFrame(rows)[["instruction", "output_1", "output_2"]]) if rows else []
    seconds = time.perf_counter() - start
    preference = {(a["instruction"], a["output_1"], a["output_2"]): a.get("preference") for a in annotated}
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        pref = preference.get((r["instruction"], r["output_1"], r["output_2"]))
        if pref is None or (isinstance(pref, float) and math.isnan(pref)):
            continue
        out.setdefault(r["pair_id"], {})[r["order"]] = 2.0 - float(pref)  # alpaca_eval: 1 = output_1
        if symmetric:
            out[r["pair_id"]]["swapped"] = 1.0 - out[r["pair_id"]]["stored"]
    timing = {"judged_now": judged_now, "seconds": round(seconds, 2), "orders_asked": len(orders),
              "seconds_per_judgment": round(seconds / judged_now, 4) if judged_now else None,
              "cache": str(caching_path) if caching_path else None}
    return out, timing


def _outcomes(pairs: Sequence[LabelledPair], judgments: dict[str, dict[str, float]]):
    done = [p for p in pairs if len(judgments.get(p.pair_id, {})) == 2]
    return done, [pair_outcomes(p, judgments[p.pair_id]["stored"], judgments[p.pair_id]["swapped"]) for p in done]


def calibration_table(pairs: Sequence[LabelledPair], judgments: dict[str, dict[str, dict[str, float]]],
                      subject: str, seed: int = 0) -> dict[str, Any]:
    """Per group of pairs, every judge's metrics and ``subject``'s paired difference from each trivial judge.

    Only pairs that ``subject`` judged in both orders count, for every judge alike, so all
    numbers in a group are over the same pairs.
    """
    table: dict[str, Any] = {}
    for group, members in group_pairs(pairs).items():
        done, subject_outcomes = _outcomes(members, judgments[subject])
        row = {"judges": {}, "vs": {}}
        for name, judged in judgments.items():
            _, outcomes = _outcomes(done, judged)
            row["judges"][name] = summarize(outcomes, n_missing=len(members) - len(done), seed=seed)
            if name != subject:
                row["vs"][name] = versus(subject_outcomes, outcomes, seed)
        table[group] = row
    return table


def verdict(table: dict[str, Any], subject: str, margin: float) -> tuple[bool, str]:
    """Trusted or not, and why (see the module docstring)."""
    group = "human" if "human" in table else next((g for g in HUMAN_SOURCES if g in table), None)
    if group is None:
        return False, "no human-labelled pairs were judged: nothing to trust the judge on"
    acc = table[group]["judges"][subject]["accuracy"]
    diff = table[group]["vs"].get("longer", {})
    n = table[group]["judges"][subject]["n_pairs"]
    if acc["low"] is None or diff.get("low") is None:
        return False, f"{group}: too few pairs judged ({n}) for an interval"
    facts = (f"{group} (n={n}): accuracy {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}], "
             f"minus always-longer {diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]")
    if diff["low"] <= margin:
        return False, f"untrusted: does not beat always-longer by more than {margin:g} outside the interval; {facts}"
    if acc["low"] <= 0.5:
        return False, f"untrusted: accuracy interval reaches chance (0.5); {facts}"
    return True, f"trusted: beats always-longer by more than {margin:g} outside the interval; {facts}"


def evaluate_judge(judge: Judge, pairs: Sequence[LabelledPair], *, cache_dir: Path | None, margin: float = 0.0,
                   seed: int = 0) -> dict[str, Any]:
    """The judge and the trivial judges on ``pairs``; see the module docstring."""
    judged, timing = model_judgments(judge, pairs, cache_dir)
    subject = judge.name
    judgments = {subject: judged, **{name: trivial_judgments(name, pairs, seed) for name in TRIVIAL_JUDGES}}
    table = calibration_table(pairs, judgments, subject, seed)
    trusted, why = verdict(table, subject, margin)
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.source] = counts.get(pair.source, 0) + 1
    return {"subject": subject, "trusted": trusted, "verdict": why, "margin": margin, "groups": table,
            "pairs": counts, "timing": timing, "judge": judge.provenance(), "identity": judge.identity(),
            "seed": seed}


def judgment_rows(pairs: Sequence[LabelledPair], judged: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per pair for inspection: the label, both judgments, the lengths."""
    return [{"pair_id": p.pair_id, "label": p.label, "labeller": p.labeller,
             "p_first_stored": judged.get(p.pair_id, {}).get("stored"),
             "p_first_swapped": judged.get(p.pair_id, {}).get("swapped"),
             "chars_1": len(p.output_1), "chars_2": len(p.output_2)} for p in pairs]
