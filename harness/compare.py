"""Models of several runs side by side, each compared item by item with one baseline model.

Run as: humpback compare runs/ablation-seed-only runs/ablation-curated [--baseline RUN/MODEL]

Every run contributes its final evaluated model (``iter_NN`` with the highest t that has an
``eval/summary.json``; every evaluated model with ``all_models``). The baseline is the seed-only
run's M0 by default (the first run configured with ``iterate.iterations: 0``), else the first
run's ``iter_00``. For each model and metric the difference from the baseline is the mean of
per-item differences on the same AlpacaEval prompts and held-out documents
(:func:`evals.paired.paired_difference` over :func:`evals.item_scores.item_scores`), with an
interval at the family-wise level (Bonferroni over every difference in the table).

Two numbers are compared only when their evaluations were the same: equal provenance (evaluation
settings digest, judge, reference, task version, ...) and equal n. Otherwise the cell says why
not; where the evaluation settings digests differ, the settings behind them are recomputed from
each run's ``config.yaml`` to name what differs. One difference can be allowed on purpose:
``system_prompt_as_model`` pairs evaluations that differ only in the system prompt the evaluated
model is given (the tag ablation trains and asks its models without tags, so its prompt is part
of the treatment, not of the instrument). A metric without per-item scores (the length-controlled
win rate) falls back to an unpaired difference from the two standard errors, marked as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.item_scores import item_scores
from evals.paired import Paired, PairingError, corrected_level, paired_difference, unpaired
from harness.gate import Metric
from harness.runview import RunView, read_run

log = logging.getLogger(__name__)

HEADLINE = "alpaca_eval/win_rate"
"""Always among the default metrics (the paper's measure), beside the runs' gated metrics."""
SYSTEM = "system"
"""The evaluation setting that holds the evaluated model's system prompt (harness.evaluate)."""


class CompareError(ValueError):
    """The runs cannot be compared as asked (no evaluated model, an unknown baseline or metric)."""


@dataclass(frozen=True)
class Entry:
    """One evaluated model of one run: a row of the table."""

    run: str
    """The run's name (``run.name``), or its directory's path where two runs share a name."""
    run_dir: Path
    model: str
    """``base`` or ``iter_NN``."""
    metrics: dict[str, Metric]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.run}/{self.model}"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / self.model / "eval"

    @property
    def tags(self) -> dict[str, str]:
        return dict((self.config.get("run") or {}).get("tags") or {})


@dataclass(frozen=True)
class Cell:
    """One model's number for one metric and, unless it is the baseline, its difference."""

    metric: Metric | None
    paired: Paired | None = None
    signal: str | None = None
    """``baseline``, ``paired items`` or ``unpaired (...)``: what the difference was computed from."""
    trusted: bool = True
    """False when this number or the baseline's comes from an untrusted evaluator (a judge that
    failed its calibration): shown with a dagger, as in the run report."""
    note: str | None = None
    """A caveat that does not stop the comparison (a system prompt taken as part of the model)."""
    why_not: str | None = None
    """Why no difference was computed; None when one was (or for the baseline)."""


@dataclass(frozen=True)
class Comparison:
    entries: list[Entry]
    """The baseline first, then the other rows in the order the runs were given."""
    baseline: Entry
    metrics: list[str]
    cells: dict[tuple[str, str], Cell]
    """(entry label, metric) -> cell."""
    level: float
    """The family-wise confidence level asked for."""
    corrected: float
    """The level of each interval (Bonferroni over ``comparisons``)."""
    comparisons: int
    power: float
    skipped: list[str] = field(default_factory=list)
    """Runs given that had no evaluated model, with why."""

    def cell(self, entry: Entry, metric: str) -> Cell:
        return self.cells[(entry.label, metric)]


# --------------------------------------------------------------------------- rows, baseline, metrics


def _entries(views: list[RunView], all_models: bool) -> tuple[list[Entry], list[str], dict[str, list[Entry]]]:
    """The rows (final models, or all with ``all_models``), the runs skipped, and every evaluated
    model of each run by run name (for a baseline that is not a row)."""
    names = [v.name for v in views]
    rows: list[Entry] = []
    skipped: list[str] = []
    every: dict[str, list[Entry]] = {}
    for view, name in zip(views, names):
        run = name if names.count(name) == 1 else str(view.root)
        evaluated = [Entry(run, view.root, m.name, dict(m.eval.metrics), view.config)
                     for m in view.models.values() if m.eval is not None and m.eval.metrics]
        every[run] = evaluated
        finals = [e for e in evaluated if e.model != "base"]
        if not finals:
            skipped.append(f"{view.root}: no evaluated model (no iter_NN/eval/summary.json)")
            continue
        rows += evaluated if all_models else [finals[-1]]
    return rows, skipped, every


def _find(spec: str, every: dict[str, list[Entry]]) -> Entry:
    run, _, model = spec.rpartition("/")
    if not run or not model:
        raise CompareError(f"--baseline {spec!r}: give RUN/MODEL, e.g. ablation-seed-only/iter_00")
    for name, entries in every.items():
        dirs = {str(e.run_dir) for e in entries} | {e.run_dir.name for e in entries}
        if run == name or run in dirs or run.rstrip("/") in dirs:
            for entry in entries:
                if entry.model == model:
                    return entry
            raise CompareError(f"--baseline {spec!r}: run {name} has no evaluated model {model!r} "
                               f"(evaluated: {', '.join(e.model for e in entries) or 'none'})")
    raise CompareError(f"--baseline {spec!r}: no run named {run!r} among {', '.join(every)}")


def default_baseline(views: list[RunView], every: dict[str, list[Entry]]) -> Entry:
    """M0 of the first run configured without iterations (seed only), else the first run's M0."""
    ordered = sorted(zip(views, every), key=lambda pair: ((pair[0].config.get("iterate") or {}).get("iterations") != 0))
    for _, run in ordered:
        for entry in every[run]:
            if entry.model == "iter_00":
                return entry
    raise CompareError("no run has an evaluated M0 (iter_00/eval/summary.json) to compare with: name one "
                       "with --baseline RUN/MODEL")


def default_metrics(entries: list[Entry]) -> list[str]:
    """The runs' gated metrics and the AlpacaEval win rate, where the models have them; every
    metric when none of those is there."""
    present = [name for e in entries for name in e.metrics]
    wanted: list[str] = []
    for entry in entries:
        for rule in (entry.config.get("gate") or {}).get("metrics") or []:
            name = rule.get("metric") if isinstance(rule, dict) else rule
            if isinstance(name, str) and name not in wanted:
                wanted.append(name)
    wanted.append(HEADLINE)
    chosen = [m for m in dict.fromkeys(wanted) if m in present]
    return chosen or list(dict.fromkeys(present))


# --------------------------------------------------------------------------- one cell


def _recomputed_eval_settings(entry: Entry, digest: Any) -> dict[str, Any] | None:
    """The evaluation settings behind ``digest``, recomputed from the run's ``config.yaml``; None
    when they cannot be (an older config, another harness version)."""
    from harness.config import ConfigError, load_config
    from harness.evaluate import eval_settings
    from pipeline.digests import settings_digest

    try:
        settings = eval_settings(load_config(entry.run_dir / "config.yaml"))
    except (ConfigError, OSError, ValueError) as exc:
        log.info("%s: evaluation settings not recomputed (%s)", entry.label, exc)
        return None
    return settings if settings_digest(settings) == digest else None


def _show(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


def _settings_gap(entry: Entry, base: Entry, digests: tuple[Any, Any]) -> dict[str, tuple[Any, Any]] | None:
    """Which evaluation settings differ between the two runs; None when that cannot be told."""
    mine, theirs = _recomputed_eval_settings(entry, digests[0]), _recomputed_eval_settings(base, digests[1])
    if mine is None or theirs is None:
        return None
    return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)}


def provenance_gap(entry: Entry, base: Entry, cur: Metric, ref: Metric,
                   system_prompt_as_model: bool) -> tuple[str | None, str | None]:
    """(why not comparable, or None; a note when comparable with a caveat)."""
    if cur.n != ref.n:
        return f"different numbers of items ({cur.n} vs {ref.n} in {base.label})", None
    keys = sorted(set(cur.provenance) | set(ref.provenance))
    differ = [k for k in keys if cur.provenance.get(k) != ref.provenance.get(k)]
    if not differ:
        return None, None
    if differ != ["eval_config"]:
        shown = "; ".join(f"{k}: {_show(cur.provenance.get(k))} vs {_show(ref.provenance.get(k))}" for k in differ)
        return f"evaluated differently ({shown})", None
    gap = _settings_gap(entry, base, (cur.provenance.get("eval_config"), ref.provenance.get("eval_config")))
    if gap is None:
        return (f"evaluation settings differ (digest {cur.provenance.get('eval_config')} vs "
                f"{ref.provenance.get('eval_config')}; what differs could not be recovered from config.yaml)"), None
    shown = "; ".join(f"{k}: {_show(a)} vs {_show(b)}" for k, (a, b) in gap.items())
    if set(gap) == {SYSTEM}:
        if system_prompt_as_model:
            return None, f"system prompts differ, taken as part of the model ({shown})"
        return (f"the evaluated model's system prompt differs ({shown}); --system-prompt-as-model compares "
                f"them when the prompt belongs to the model, as in the tag ablation"), None
    return f"evaluation settings differ ({shown})", None


def _items_differ(a, b) -> str | None:
    """Items with the same key whose content digests disagree (lm-eval's ``doc_hash``)."""
    both = set(a.keys_checked) & set(b.keys_checked)
    changed = sum(1 for k in both if a.keys_checked[k] and b.keys_checked[k] and a.keys_checked[k] != b.keys_checked[k])
    return f"{changed} of the items differ in content (doc_hash)" if changed else None


def compare_cell(entry: Entry, base: Entry, metric: str, *, level: float, power: float,
                 system_prompt_as_model: bool = False) -> Cell:
    """One model's number for ``metric`` and its difference from the baseline's, or why not."""
    cur, ref = entry.metrics.get(metric), base.metrics.get(metric)
    trusted = (cur is None or cur.trusted is not False) and (ref is None or ref.trusted is not False)
    if cur is None or cur.value is None:
        return Cell(cur, trusted=trusted, why_not=f"{metric} not evaluated in {entry.label}")
    if entry.label == base.label:
        return Cell(cur, signal="baseline", trusted=trusted)
    if ref is None or ref.value is None:
        return Cell(cur, trusted=trusted, why_not=f"{metric} not evaluated in the baseline {base.label}")
    why, note = provenance_gap(entry, base, cur, ref, system_prompt_as_model)
    if why is not None:
        return Cell(cur, trusted=trusted, why_not=why)
    mine, theirs = item_scores(entry.eval_dir, metric), item_scores(base.eval_dir, metric)
    if mine is None or theirs is None:
        diff = unpaired(cur.value, ref.value, cur.stderr, ref.stderr, cur.n, level=level, power=power)
        return Cell(cur, diff, "unpaired (no per-item scores)", trusted, note)
    why = _items_differ(mine, theirs)
    if why is not None:
        return Cell(cur, trusted=trusted, why_not=why)
    try:
        diff = paired_difference(mine.values, theirs.values, level=level, power=power,
                                 bounds=mine.bounds or theirs.bounds)
    except PairingError as exc:
        return Cell(cur, trusted=trusted, why_not=str(exc))
    return Cell(cur, diff, "paired items", trusted, note)


# --------------------------------------------------------------------------- the table


def compare_runs(run_dirs: list[str | Path], *, baseline: str | None = None, metrics: list[str] | None = None,
                 level: float = 0.95, power: float = 0.8, correction: str = "bonferroni", all_models: bool = False,
                 system_prompt_as_model: bool = False) -> Comparison:
    """The comparison table of ``run_dirs`` (see the module docstring).

    Args:
        baseline: ``RUN/MODEL`` (run name or directory); default: the seed-only run's M0.
        metrics: metric names, or ``["all"]``; default: :func:`default_metrics`.
        level: family-wise confidence level; ``correction="bonferroni"`` spreads it over every
            difference in the table, ``"none"`` uses it for each.

    Raises:
        CompareError: nothing to compare, an unknown baseline or metric.
        FileNotFoundError: a run directory that does not exist.
    """
    if not run_dirs:
        raise CompareError("name at least one run directory")
    views = [read_run(d) for d in run_dirs]
    rows, skipped, every = _entries(views, all_models)
    if not rows:
        raise CompareError("no run has an evaluated model: " + "; ".join(skipped))
    base = _find(baseline, every) if baseline else default_baseline(views, every)
    entries = [base] + [e for e in rows if e.label != base.label]
    if metrics in (None, []):
        names = default_metrics(entries)
    elif metrics == ["all"]:
        names = list(dict.fromkeys(name for e in entries for name in e.metrics))
    else:
        known = {name for e in entries for name in e.metrics}
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise CompareError(f"--metrics: {unknown} not evaluated in any of these models; known: {sorted(known)}")
        names = list(metrics)
    comparisons = (len(entries) - 1) * len(names)
    each = corrected_level(level, comparisons) if correction == "bonferroni" else level
    cells = {(e.label, m): compare_cell(e, base, m, level=each, power=power,
                                        system_prompt_as_model=system_prompt_as_model)
             for e in entries for m in names}
    return Comparison(entries, base, names, cells, level, each, comparisons, power, skipped)
