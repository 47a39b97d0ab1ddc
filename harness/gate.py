"""Regression gates: may the loop go on after this iteration?

A metric regresses when it moves in its worse direction by more than both an absolute tolerance
and ``z`` standard errors of the difference (so noise from small evaluation subsets does not stop
the loop, and a tiny but certain drop does not either). Numbers with different provenance (task
version, sample count, evaluator config) are never compared: the gate refuses, and fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.io import write_json_atomic

if TYPE_CHECKING:  # the view is read into this module's types, so it is not imported at run time
    from harness.config import RunConfig
    from harness.runview import RunView

GATE = "gate.json"
"""Each iteration's gate, in ``iter_NN/``."""


@dataclass(frozen=True)
class Metric:
    """One number of an evaluation summary (``<model>/eval/summary.json``), as
    :mod:`harness.runview` reads it."""

    name: str
    value: float | None
    """None where the evaluator produced no number: gates take the metric as missing."""
    stderr: float | None = None
    n: int | None = None
    higher_is_better: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)
    """What must match for two values to be comparable: task version, evaluator digest, ..."""
    trusted: bool = True
    """False when the evaluator itself failed its check (e.g. a judge below its accuracy floor)."""


@dataclass(frozen=True)
class Rule:
    metric: str
    abs_tol: float = 0.0
    z: float = 2.0


@dataclass(frozen=True)
class Decision:
    check: str
    passed: bool
    reason: str
    current: float | None = None
    baseline: float | None = None
    threshold: float | None = None

    def message(self) -> str:
        return f"{self.check}: {self.reason}"


def compare(current: Metric | None, baseline: Metric | None, rule: Rule) -> Decision:
    """One gated metric against its baseline."""
    if current is None:
        return Decision(rule.metric, False, "metric missing from this iteration's evaluation")
    if baseline is None:
        return Decision(rule.metric, True, "no baseline to compare with", current.value)
    if not current.trusted or not baseline.trusted:
        which = "this iteration's" if not current.trusted else "the baseline's"
        return Decision(rule.metric, False, f"refused: {which} evaluator is untrusted", current.value, baseline.value)
    mismatch = _provenance_mismatch(current, baseline)
    if mismatch:
        return Decision(rule.metric, False, f"refused: provenance differs ({mismatch})", current.value, baseline.value)
    drop = (baseline.value - current.value) if current.higher_is_better else (current.value - baseline.value)
    se = math.sqrt((current.stderr or 0.0) ** 2 + (baseline.stderr or 0.0) ** 2)
    threshold = max(rule.abs_tol, rule.z * se)
    if drop > threshold:
        word = "dropped" if current.higher_is_better else "rose"
        return Decision(
            rule.metric, False,
            f"{word} from {baseline.value:.4g} to {current.value:.4g}, by {abs(drop):.4g} > threshold "
            f"{threshold:.4g} (max of abs_tol {rule.abs_tol:g} and {rule.z:g} x stderr {se:.4g})",
            current.value, baseline.value, threshold,
        )
    return Decision(rule.metric, True, f"{current.value:.4g} vs baseline {baseline.value:.4g} "
                    f"(change within threshold {threshold:.4g})", current.value, baseline.value, threshold)


def _provenance_mismatch(a: Metric, b: Metric) -> str:
    parts = []
    if a.n is not None and b.n is not None and a.n != b.n:
        parts.append(f"n {b.n} vs {a.n}")
    for key in sorted(set(a.provenance) | set(b.provenance)):
        if a.provenance.get(key) != b.provenance.get(key):
            parts.append(f"{key} {b.provenance.get(key)!r} vs {a.provenance.get(key)!r}")
    return "; ".join(parts)


def limit_check(name: str, value: float | None, *, minimum: float | None = None, maximum: float | None = None) -> Decision:
    """A data gate: a count or rate that must stay within bounds."""
    if value is None:
        return Decision(name, False, "value missing")
    if minimum is not None and value < minimum:
        return Decision(name, False, f"{value:g} is below the minimum {minimum:g}", value, None, minimum)
    if maximum is not None and value > maximum:
        return Decision(name, False, f"{value:g} is above the maximum {maximum:g}", value, None, maximum)
    return Decision(name, True, f"{value:g} within limits", value, None, minimum if minimum is not None else maximum)


@dataclass
class GateResult:
    """An iteration's gate, as decided and as ``iter_NN/gate.json`` holds it."""

    passed: bool
    decisions: list[Decision]
    baseline: str | None = None
    evaluated: bool | None = None
    """Whether the evaluation checks were part of it (False: only the data checks, before M_t
    was evaluated); None where not recorded."""

    def failures(self) -> list[Decision]:
        return [d for d in self.decisions if not d.passed]

    def as_dict(self) -> dict[str, Any]:
        """What ``gate.json`` holds."""
        out = {"passed": self.passed, "baseline": self.baseline, "decisions": [asdict(d) for d in self.decisions]}
        return out if self.evaluated is None else {**out, "evaluated": self.evaluated}


def decide(decisions: Sequence[Decision], baseline: str | None = None, evaluated: bool | None = None) -> GateResult:
    return GateResult(all(d.passed for d in decisions), list(decisions), baseline, evaluated)


# --------------------------------------------------------------------------- an iteration's checks


def pick_baseline(history: dict[int, dict[str, Metric]], metric: str, mode: str, current: int) -> tuple[int | None, Metric | None]:
    """The iteration and value to compare iteration ``current`` with, for one metric."""
    earlier = {t: ms[metric] for t, ms in history.items() if t < current and metric in ms}
    if not earlier:
        return None, None
    if mode == "previous":
        t = max(earlier)
    elif mode == "m0":
        t = 0 if 0 in earlier else min(earlier)
    else:  # best so far, in the metric's better direction
        sign = 1 if next(iter(earlier.values())).higher_is_better else -1
        t = max(earlier, key=lambda k: (sign * earlier[k].value, -k))
    return t, earlier[t]


def eval_decisions(history: dict[int, dict[str, Metric]], current: int, rules: Sequence[Rule], mode: str) -> list[Decision]:
    decisions = []
    for rule in rules:
        t, base = pick_baseline(history, rule.metric, mode, current)
        d = compare(history.get(current, {}).get(rule.metric), base, rule)
        if t is not None:
            d = Decision(d.check, d.passed, f"{d.reason} [baseline iter_{t:02d}]", d.current, d.baseline, d.threshold)
        decisions.append(d)
    return decisions


def data_decisions(selected: int | None, contaminated: int | None, unscored_rate: float | None, *,
                   min_selected: int, max_unscored_rate: float, max_contamination_rate: float) -> list[Decision]:
    """The data checks of an iteration: enough selected pairs, few unscored, few contaminated
    (``selected`` and ``contaminated`` from the select stage, ``unscored_rate`` from curation)."""
    contaminated = contaminated or 0
    total = (selected or 0) + contaminated
    return [
        limit_check("data/selected", selected, minimum=min_selected),
        limit_check("curation/unscored_rate", unscored_rate, maximum=max_unscored_rate),
        limit_check("data/contamination_rate", contaminated / total if total else 0.0, maximum=max_contamination_rate),
    ]


def augment_yield_check(stats: dict[str, Any], max_reject_rate: float) -> Decision:
    """Augmentation's yield as a data check: the share of corpus segments that got no usable
    instruction, failing above ``max_reject_rate`` with the reasons counted (``unfinished``:
    the instruction ran past the new-token budget; ``echo``: it copied its segment; ...)."""
    segments = stats.get("segments")
    rejected = stats.get("rejected") or {}
    if not isinstance(segments, int) or segments <= 0 or not isinstance(rejected, dict):
        return Decision("augment/reject_rate", False, "augmentation stats missing")
    rate = sum(v for v in rejected.values() if isinstance(v, int)) / segments
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) or "none"
    if rate > max_reject_rate:
        return Decision("augment/reject_rate", False,
                        f"{rate:.2f} of {segments} segments got no usable instruction, above the maximum "
                        f"{max_reject_rate:g} (reasons: {reasons}); see augment/rejects.jsonl", rate, None,
                        max_reject_rate)
    return Decision("augment/reject_rate", True, f"{rate:.2f} within limits (reasons: {reasons})", rate, None,
                    max_reject_rate)


# --------------------------------------------------------------------------- on a run directory


def decide_iteration(view: RunView, cfg: RunConfig, t: int, evaluated: bool) -> GateResult:
    """Iteration ``t``'s gate, decided from the run directory (so ``humpback gate`` can redo it):
    its data checks and, once ``evaluated``, its regression checks against earlier iterations."""
    it = view.model(f"iter_{t:02d}")
    decisions = data_decisions(it.selection.selected, it.selection.contaminated, it.curation.unscored_rate,
                               min_selected=cfg.gate.min_selected, max_unscored_rate=cfg.gate.max_unscored_rate,
                               max_contamination_rate=cfg.gate.max_contamination_rate)
    augment = view.stages.get("augment")
    if augment is not None:
        decisions.append(augment_yield_check(augment.stats, cfg.gate.max_augment_reject_rate))
    if evaluated and cfg.eval.enabled:
        history = {}
        for i in range(0, t + 1):
            summary = view.model(f"iter_{i:02d}").eval
            if summary is not None:
                history[i] = {name: m for name, m in summary.metrics.items() if m.value is not None}
        rules = [Rule(r.metric, r.abs_tol, r.z) for r in cfg.gate.metrics]
        decisions += eval_decisions(history, t, rules, cfg.gate.baseline)
    return decide(decisions, baseline=cfg.gate.baseline, evaluated=evaluated)


def write_gate(run_root: Path, t: int, result: GateResult) -> None:
    write_json_atomic(Path(run_root) / f"iter_{t:02d}" / GATE, result.as_dict())
