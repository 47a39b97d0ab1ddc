"""The report's tables, as (header, rows) of text cells: metrics by model, curation and training
by model, gate failures, and each stage's time and memory.

Columns are the models: ``base`` (untuned), ``iter_00`` (M0, seed only), ``iter_01``, ... What is
missing shows as "–"; a judge number whose evaluator failed its own check is marked "†".
"""

from __future__ import annotations

import math
from typing import Any, Callable

from harness.gate import FIXED_POINT, UNFILTERED, Metric
from harness.runview import MeanStd, ModelView, RunView, Stage

DASH = "–"
UNTRUSTED = "†"
UNTRUSTED_NOTE = (f"{UNTRUSTED} untrusted: the judge did not beat always-choosing-the-longer-answer on "
                  "human-labelled pairs outside the interval (judge/minus_longer), so gates refuse to compare "
                  "this number.")
SCORES = ("1", "2", "3", "4", "5", "unscored")

Table = tuple[list[str], list[list[str]]]
"""(header, rows): header is ["metric", *columns]; every row has one cell per header entry."""


# --------------------------------------------------------------------------- cells


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _decimals(value: float) -> int:
    return 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3


def fmt(value: Any, decimals: int | None = None) -> str:
    """A number as the tables show it; None (or not a number) is "–"."""
    if not is_number(value):
        return DASH
    if isinstance(value, int) and decimals is None:
        return str(value)
    return f"{value:.{_decimals(value) if decimals is None else decimals}f}"


def plus_minus(value: Any, spread: Any) -> str:
    """``"0.420 ± 0.050"``: the spread with as many decimals as the value; "–" without a value."""
    if not is_number(value):
        return DASH
    if not is_number(spread):
        return fmt(value)
    places = _decimals(value)
    return f"{fmt(value, places)} ± {fmt(spread, places)}"


def metric_cell(metric: Metric | None) -> str:
    """``"0.420 ± 0.050"``, with "†" when the evaluator is untrusted; "–" when missing."""
    if metric is None:
        return DASH
    text = plus_minus(metric.value, metric.stderr)
    if text != DASH and metric.trusted is False:
        text += f" {UNTRUSTED}"
    return text


def _mean_std_cell(stats: MeanStd) -> str:
    return plus_minus(stats.mean, stats.std)


def _histogram_cell(hist: dict[str, Any]) -> str:
    if not hist:
        return DASH
    return " ".join(f"{'?' if k == 'unscored' else k}:{hist.get(k, 0)}" for k in SCORES if k in hist)


def _gate_cell(model: ModelView) -> str:
    if model.gate is None:
        return DASH
    return "passed" if model.gate.passed else "FAILED"


# --------------------------------------------------------------------------- evaluation


def _with_interval(check, key: str) -> str:
    return _interval_cell({k: getattr(check, k) for k in (key, f"{key}_low", f"{key}_high")}, key)


def _interval_cell(numbers: dict[str, Any], key: str) -> str:
    """``"0.620 [0.540, 0.700]"`` from ``key``, ``key_low``, ``key_high``; "–" when missing."""
    value, low, high = (numbers.get(k) for k in (key, f"{key}_low", f"{key}_high"))
    if value is None:
        return DASH
    return fmt(value) if low is None or high is None else f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def metric_of(model: ModelView, name: str) -> Metric | None:
    return model.eval.metrics.get(name) if model.eval else None


def metric_table(view: RunView) -> Table:
    """Evaluation metrics (rows, in the evaluator's order) by model (columns)."""
    models = list(view.models.values())
    names: list[str] = []
    for model in models:
        for name in (model.eval.metrics if model.eval else {}):
            if name not in names:
                names.append(name)
    rows = [[name] + [metric_cell(metric_of(m, name)) for m in models] for name in names]
    for key in ("human_accuracy", "minus_longer", "gpt4_agreement"):
        cells = [_with_interval(m.eval.judge_check, key) if m.eval else DASH for m in models]
        if any(cell != DASH for cell in cells):
            rows.append([f"judge/{key}"] + cells)
    for key in ("planted_accuracy", "position_bias"):
        cells = [fmt(getattr(m.eval.judge_check, key)) if m.eval else DASH for m in models]
        if any(cell != DASH for cell in cells):
            rows.append([f"judge/{key}"] + cells)
    return ["metric", *view.models], rows


LC_GLM_NOTES = {
    "length_controlled_minimal": ("alpaca_eval/lc_win_rate: alpaca_eval's length_controlled_minimal GLM "
                                  "(length term only, fit on each model's own annotations; bootstrap "
                                  "standard error), not comparable with leaderboard LC win rates"),
    "length_controlled_v1": "alpaca_eval/lc_win_rate: alpaca_eval 2's length_controlled_v1 GLM",
}


def metric_notes(view: RunView, table: Table) -> list[str]:
    """Footnotes the evaluation table needs: untrusted judges, and which LC GLM made the LC win rates."""
    notes = []
    if any(UNTRUSTED in cell for row in table[1] for cell in row):
        notes.append(UNTRUSTED_NOTE)
    verdicts = {m.eval.judge_check.verdict for m in view.models.values() if m.eval and m.eval.judge_check.verdict}
    notes += [f"judge calibration: {v}" for v in sorted(verdicts)]
    lc = [metric_of(m, "alpaca_eval/lc_win_rate") for m in view.models.values()]
    glms = {metric.provenance.get("lc_glm") for metric in lc if metric is not None} - {None}
    notes += [LC_GLM_NOTES.get(g, f"alpaca_eval/lc_win_rate: GLM {g}") for g in sorted(glms)]
    return notes


# --------------------------------------------------------------------------- data and training


def _curation(field: str) -> Callable[[ModelView], str]:
    return lambda m: fmt(getattr(m.curation, field))


def _selection(field: str) -> Callable[[ModelView], str]:
    return lambda m: fmt(getattr(m.selection, field))


DATA_ROWS: list[tuple[str, Callable[[ModelView], str]]] = [
    ("train pairs", lambda m: fmt(m.training.get("train_pairs"))),
    ("final loss", lambda m: fmt(m.training.get("final_loss"))),
    ("pairs rated", _curation("pairs")),
    ("score histogram", lambda m: _histogram_cell(m.curation.histogram)),
    ("unscored rate", _curation("unscored_rate")),
    ("planted rating text (pairs)", lambda m: _planted_cell(m.curation)),
    ("curator accuracy, human labels", lambda m: _interval_cell(m.curation.calibration, "human_accuracy")),
    ("curator minus always-longer", lambda m: _interval_cell(m.curation.calibration, "human_minus_longer")),
    ("curator agreement with GPT-4", lambda m: _interval_cell(m.curation.calibration, "gpt4_accuracy")),
    ("curator rank corr. with GPT-4", lambda m: _interval_cell(m.curation.calibration, "spearman_gpt4")),
    ("k suggested by labels", lambda m: fmt(m.curation.calibration.get("suggested_k"))),
    ("curator precision", lambda m: fmt(m.selection.curator.get("precision"))),  # P/R depend on k: select's
    ("curator recall", lambda m: fmt(m.selection.curator.get("recall"))),
    ("selected", _selection("selected")),
    ("keep rate", _selection("keep_rate")),
    ("instruction chars", lambda m: _mean_std_cell(m.selection.instruction_chars)),
    ("response chars", lambda m: _mean_std_cell(m.selection.response_chars)),
    ("instruction distinct-2", _selection("instruction_distinct_2")),
    ("near-duplicate rate", _selection("near_duplicate_rate")),
    ("contaminated", _selection("contaminated")),
    ("left out as planted", _selection("flagged")),
    ("gate", _gate_cell),
]
"""(label, cell of one model) of the curation, selected-data and training table."""


def _planted_cell(curation) -> str:
    """Pairs flagged for planted rating text, and the kinds found: "2 (rating 2, directive 1)"."""
    if curation.planted is None:
        return fmt(None)
    kinds = ", ".join(f"{k} {v}" for k, v in curation.planted_kinds.items())
    return f"{fmt(curation.planted)} ({kinds})" if kinds else fmt(curation.planted)


def data_table(view: RunView) -> Table:
    """Curation, selected-data and training numbers by model; the base model has none."""
    models = list(view.models.values())
    return ["", *view.models], [[label] + [cell(m) for m in models] for label, cell in DATA_ROWS]


def gate_failures(view: RunView) -> list[str]:
    """``"iter_02: <check>: <reason>"`` for every failed check of every gate."""
    return [f"{m.name}: {d.check}: {d.reason}"
            for m in view.models.values() if m.gate is not None for d in m.gate.decisions if not d.passed]


def _gate_outcomes(view: RunView, outcome: str) -> list[str]:
    """``"iter_02: <check>: <reason>"`` for each gate's decision with that outcome."""
    return [f"{m.name}: {d.check}: {d.reason}" for m in view.models.values() if m.gate is not None
            for d in [m.gate.with_outcome(outcome)] if d is not None]


def gate_stops(view: RunView) -> list[str]:
    """``"iter_02: data/changed: fixed point: ..."`` where an iteration repeated the previous
    one's training data (the loop ends there unless ``gate.stop_at_fixed_point`` is off)."""
    return _gate_outcomes(view, FIXED_POINT)


def unfiltered_curations(view: RunView) -> list[str]:
    """``"iter_01: curation/filtered: unfiltered: ..."`` where the threshold left out no scored
    candidate, so that iteration's selection is the augmented data, unfiltered."""
    return _gate_outcomes(view, UNFILTERED)


def gate_table(view: RunView) -> Table:
    """Every evaluation check of every gate: the paired change with its interval, the tolerance,
    what the comparison could have seen (MDE; blind, with the n it would need) and the outcome."""
    header = ["iteration", "metric", "compared", "change [interval]", "level", "n", "tolerance", "MDE",
              "blind (n needed)", "outcome"]
    rows = []
    for m in view.models.values():
        for d in (m.gate.decisions if m.gate is not None else []):
            if d.outcome is None:  # a data check (a limit), listed with the failures
                continue
            interval = DASH if d.estimate is None else f"{d.estimate:+.3g} [{d.low:+.3g}, {d.high:+.3g}]"
            blind = DASH if d.blind is None else ("yes" + (f" ({d.items_needed})" if d.items_needed else "")
                                                   if d.blind else "no")
            where = f"{d.signal}" + ("" if d.baseline_iteration is None or "vs iter" in (d.signal or "")
                                     else f" vs iter_{d.baseline_iteration:02d}")
            rows.append([m.name, d.check, where if d.signal else DASH, interval,
                         DASH if d.level is None else f"{d.level:.1%}", fmt(d.n), fmt(d.threshold),
                         fmt(d.mde), blind, d.outcome.upper() if d.outcome in ("regression", "inconclusive")
                         else d.outcome])
    return header, rows


def head_to_head_table(view: RunView) -> Table:
    """Each model judged directly against earlier ones: win rate with its 95% interval."""
    header = ["model", "against", "win rate [95% interval]", "wins / losses / draws", "n", "MDE"]
    rows = []
    for m in view.models.values():
        h2h = m.head_to_head or {}
        mark = "" if h2h.get("trusted") is not False else f" {UNTRUSTED}"
        for against, r in sorted((h2h.get("against") or {}).items()):
            interval = r.get("interval_95") or [None, None]
            cell = (f"{fmt(r.get('win_rate'), 1)} [{fmt(interval[0], 1)}, {fmt(interval[1], 1)}]{mark}"
                    if is_number(r.get("win_rate")) else DASH)
            rows.append([m.name, against, cell,
                         f"{r.get('n_wins', DASH)} / {r.get('n_wins_base', DASH)} / {r.get('n_draws', DASH)}",
                         fmt(r.get("n")), fmt(r.get("mde_95"))])
    return header, rows


# --------------------------------------------------------------------------- stages


def peak_memory(stages: list[Stage]) -> str | None:
    """The highest resident-memory peak any stage recorded, and which stage: ``"1.23 GiB (iter_01/curate)"``."""
    peaks = [(s.peak_rss_mib, s.name) for s in stages if is_number(s.peak_rss_mib)]
    if not peaks:
        return None
    peak, name = max(peaks, key=lambda p: p[0])
    text = f"{peak / 1024:.2f} GiB ({name})"
    gpu = [(s.gpu_peak_mib, s.name) for s in stages if is_number(s.gpu_peak_mib)]
    if gpu:
        gpu_peak, gpu_name = max(gpu, key=lambda p: p[0])
        text += f"; GPU {gpu_peak / 1024:.2f} GiB ({gpu_name})"
    return text


def stage_table(stages: list[Stage]) -> Table:
    """Each stage's seconds, and its memory peak, at start and after, in GiB, plus its GPU peak
    where any stage used a GPU; "–" where a manifest predates a field."""

    def gib(value: Any) -> str:
        return f"{value / 1024:.2f}" if is_number(value) else DASH

    gpu = any(is_number(s.gpu_peak_mib) for s in stages)
    rows = [[s.name, f"{s.seconds:.1f}" if is_number(s.seconds) else DASH,
             gib(s.peak_rss_mib), gib(s.rss_start_mib), gib(s.rss_end_mib)]
            + ([gib(s.gpu_peak_mib)] if gpu else [])
            for s in stages]
    return ["stage", "seconds", "peak GiB", "at start GiB", "after GiB"] + (["GPU peak GiB"] if gpu else []), rows

