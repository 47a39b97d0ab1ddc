"""Regression gates: may the loop go on after this iteration?

Every model is scored on the same items (AlpacaEval prompts, held-out documents), so a gated
metric is compared item by item with its baseline: the mean per-item difference, with a
confidence interval (:mod:`evals.paired`), decides one of three outcomes, in the metric's better
direction and its own units:

- ``pass``: the whole interval lies above ``-abs_tol`` (no drop larger than the tolerance);
- ``regression``: the whole interval lies below ``-abs_tol``;
- ``inconclusive``: it straddles ``-abs_tol``; ``gate.on_inconclusive`` says whether the loop goes
  on (the default, said loudly) or stops.

The AlpacaEval win rate is gated on the head-to-head judgment of this model against its
baseline (both answered the same prompts; 50 = no difference), where that was judged. The
intervals of several gated metrics are widened together (Bonferroni) so that all hold at
``gate.level``. Each decision also says what it could have seen: the smallest detectable
difference (MDE, at ``gate.power``) at the evaluated n, and whether the gate is blind (MDE above
its tolerance) with the n it would need. Numbers with different provenance (task version, sample
count, evaluator config) are never compared: the gate refuses, and fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from evals.paired import Paired, corrected_level, unpaired
from pipeline.digests import settings_digest
from pipeline.io import read_jsonl, write_json_atomic

if TYPE_CHECKING:  # the view is read into this module's types, so it is not imported at run time
    from harness.config import RunConfig
    from harness.runview import RunView, Stage

GATE = "gate.json"
"""Each iteration's gate, in ``iter_NN/``."""

PASS, REGRESSION, INCONCLUSIVE, REFUSED, MISSING, NO_BASELINE = (
    "pass", "regression", "inconclusive", "refused", "missing", "no baseline")
FIXED_POINT, CHANGED = "fixed point", "changed"
"""Outcomes of the ``data/changed`` check: did curation with M_{t-1} select other data than the
iteration before it?"""
FILTERED, UNFILTERED = "filtered", "unfiltered"
"""Outcomes of the ``curation/filtered`` check: did the threshold k leave out any scored pair?"""


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


@dataclass(frozen=True)
class Evidence:
    """How a metric moved between the baseline and this model: a paired difference and what it
    was computed from."""

    paired: Paired
    signal: str
    """``paired items``, ``head-to-head vs iter_NN`` or ``unpaired (...)``: what was compared."""
    current: float
    baseline: float
    """The two numbers shown beside the difference (head-to-head: the win rate and 50)."""


@dataclass(frozen=True)
class Decision:
    check: str
    passed: bool
    reason: str
    current: float | None = None
    baseline: float | None = None
    threshold: float | None = None
    outcome: str | None = None
    """Evaluation checks: pass, regression, inconclusive, refused, missing, no baseline (None for
    the data checks, which are limits)."""
    signal: str | None = None
    estimate: float | None = None
    """Mean per-item change, current minus baseline, in the metric's units (head-to-head: the
    win rate minus 50)."""
    low: float | None = None
    high: float | None = None
    level: float | None = None
    """Confidence level of this interval (after the correction for several gated metrics)."""
    method: str | None = None
    n: int | None = None
    mde: float | None = None
    """The smallest change found with ``gate.power`` at this n and level."""
    sd: float | None = None
    """The spread of the per-item differences behind the interval and the MDE (what
    ``humpback eval-size`` plans other sizes from)."""
    blind: bool | None = None
    """True when the MDE exceeds the tolerance (or cannot be computed): a regression of the
    tolerance's size would most likely pass unseen."""
    items_needed: int | None = None
    """For a blind gate, the n at which its MDE would fall to the tolerance."""
    baseline_iteration: int | None = None

    def message(self) -> str:
        return f"{self.check}: {self.reason}"


def compare(current: Metric | None, baseline: Metric | None, rule: Rule, *, evidence: Evidence | None = None,
            level: float = 0.95, power: float = 0.8, on_inconclusive: str = "continue") -> Decision:
    """One gated metric against its baseline: refused unless both are trusted and comparable;
    then decided on ``evidence`` (a paired difference) or, without it, on the two summary
    numbers' standard errors as if independent."""
    if current is None:
        return Decision(rule.metric, False, "metric missing from this iteration's evaluation", outcome=MISSING)
    if baseline is None:
        return Decision(rule.metric, True, "no baseline to compare with", current.value, outcome=NO_BASELINE)
    if not current.trusted or not baseline.trusted:
        which = "this iteration's" if not current.trusted else "the baseline's"
        return Decision(rule.metric, False, f"refused: {which} evaluator is untrusted", current.value, baseline.value,
                        outcome=REFUSED)
    mismatch = _provenance_mismatch(current, baseline)
    if mismatch:
        return Decision(rule.metric, False, f"refused: provenance differs ({mismatch})", current.value, baseline.value,
                        outcome=REFUSED)
    if evidence is None:
        evidence = Evidence(unpaired(current.value, baseline.value, current.stderr, baseline.stderr, current.n,
                                     level=level, power=power),
                            "unpaired (no per-item scores)", current.value, baseline.value)
    return _decide(rule, evidence, current.higher_is_better, on_inconclusive)


def _decide(rule: Rule, ev: Evidence, higher_is_better: bool, on_inconclusive: str) -> Decision:
    p, tol = ev.paired, rule.abs_tol
    sign = 1.0 if higher_is_better else -1.0
    worst, best = sorted((sign * p.low, sign * p.high))  # the interval in the better direction
    if best < -tol:
        outcome = REGRESSION
    elif worst >= -tol:
        outcome = PASS
    else:
        outcome = INCONCLUSIVE
    blind = p.mde is None or p.mde > tol
    needed = p.items_needed(tol) if blind else None
    word = "worse" if higher_is_better else "better"
    seen = (f"MDE {_g(p.mde)}" if p.mde is not None else "MDE unknown (no spread to plan from)") + (
        f", BLIND: above the tolerance {tol:g}" + (f"; n = {needed} would see it" if needed else "") if blind else "")
    interval = f"{_signed(p.estimate)} [{_signed(p.low)}, {_signed(p.high)}]"
    what = (f"{ev.signal}: change {interval} ({p.level:.1%} {p.method} interval, n={p.n}; "
            f"{_g(ev.current)} vs {_g(ev.baseline)})")
    if outcome == REGRESSION:
        reason = f"regression: {what} lies wholly beyond the tolerance of {tol:g} {word}; {seen}"
    elif outcome == PASS:
        reason = f"pass: {what} excludes a drop beyond the tolerance {tol:g}; {seen}"
    else:
        action = "the loop goes on (gate.on_inconclusive=continue)" if on_inconclusive == "continue" else \
            "the loop stops (gate.on_inconclusive=stop)"
        reason = f"INCONCLUSIVE: {what} straddles the tolerance {tol:g}; {seen}; {action}"
    passed = outcome == PASS or (outcome == INCONCLUSIVE and on_inconclusive == "continue")
    return Decision(rule.metric, passed, reason, ev.current, ev.baseline, tol, outcome=outcome, signal=ev.signal,
                    estimate=p.estimate, low=p.low, high=p.high, level=p.level, method=p.method, n=p.n, mde=p.mde,
                    sd=p.sd, blind=blind, items_needed=needed)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _signed(x: float) -> str:
    return f"{x:+.4g}"


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

    def with_outcome(self, outcome: str) -> Decision | None:
        """The first decision whose outcome is ``outcome``, if any."""
        return next((d for d in self.decisions if d.outcome == outcome), None)

    def fixed_point(self) -> Decision | None:
        """The ``data/changed`` decision when this iteration repeated the previous one's data."""
        return self.with_outcome(FIXED_POINT)

    def unfiltered(self) -> Decision | None:
        """The ``curation/filtered`` decision when the threshold left out no scored candidate."""
        return self.with_outcome(UNFILTERED)

    def as_dict(self) -> dict[str, Any]:
        """What ``gate.json`` holds."""
        decisions = [{k: v for i, (k, v) in enumerate(asdict(d).items()) if i < 6 or v is not None}
                     for d in self.decisions]  # the data checks are limits: no interval fields
        out = {"passed": self.passed, "baseline": self.baseline, "decisions": decisions}
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


EvidenceFor = Callable[[str, int, float], "Evidence | None"]
"""``(metric, baseline iteration, level) -> Evidence``: the paired difference between this
iteration and that one, or None where no per-item scores exist."""


def eval_decisions(history: dict[int, dict[str, Metric]], current: int, rules: Sequence[Rule], mode: str, *,
                   evidence_for: EvidenceFor | None = None, level: float = 0.95, power: float = 0.8,
                   correction: str = "bonferroni", on_inconclusive: str = "continue") -> list[Decision]:
    """Every gated metric of iteration ``current`` against its baseline (``mode``), each interval
    at ``level`` corrected for the number of gated metrics."""
    each = corrected_level(level, len(rules)) if correction == "bonferroni" else level
    decisions = []
    for rule in rules:
        t, base = pick_baseline(history, rule.metric, mode, current)
        now = history.get(current, {}).get(rule.metric)
        evidence = evidence_for(rule.metric, t, each) if (evidence_for and t is not None and now is not None
                                                          and base is not None) else None
        d = compare(now, base, rule, evidence=evidence, level=each, power=power, on_inconclusive=on_inconclusive)
        if t is not None:
            d = replace(d, reason=f"{d.reason} [baseline iter_{t:02d}]", baseline_iteration=t)
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


def selection_change_check(root: Path, t: int, current: Stage | None, previous: Stage | None) -> Decision | None:
    """Did iteration ``t`` select other training data than iteration ``t - 1``? (None for ``t`` < 2,
    where M_{t-1} is M0 and trained on the seed alone, or before both selections are committed.)

    The same (instruction, response) pairs in the same order are a fixed point of the loop: M_t is
    fine-tuned from the same base on the same seed and selected pairs with the same settings and
    seed as M_{t-1}, so it repeats M_{t-1}, whose curation of the same candidates repeats this
    one, and so on. (The scores the pairs carry are not trained on, so they may differ.) The
    decision passes either way (nothing regressed); its outcome, ``fixed point`` or ``changed``, is
    what ``gate.stop_at_fixed_point`` acts on."""
    if t < 2 or current is None or previous is None or not (current.done and previous.done):
        return None
    now, before = _training_pairs(root / current.name / SELECTED), _training_pairs(root / previous.name / SELECTED)
    ids_now, ids_before = {p[0] for p in now}, {p[0] for p in before}
    overlap = (f"{len(ids_now & ids_before)} of its {len(now)} pairs were selected by iter_{t - 1:02d} too, "
               f"{len(ids_before - ids_now)} of iter_{t - 1:02d}'s {len(before)} dropped")
    if now == before:
        return Decision("data/changed", True,
                        f"fixed point: iter_{t:02d} selected exactly iter_{t - 1:02d}'s training data ({overlap}; "
                        f"the same instructions and responses in the same order, digest "
                        f"{settings_digest(now)[:12]}), so M_{t} would repeat M_{t - 1} and every later iteration "
                        f"would repeat this one", outcome=FIXED_POINT)
    return Decision("data/changed", True, f"the selection changed: {overlap}", outcome=CHANGED)


SELECTED = "data.jsonl"
"""The select stage's training pairs."""


def curation_filter_check(root: Path, t: int, select: Stage | None, on_unfiltered: str) -> Decision | None:
    """Did iteration ``t``'s threshold leave out any scored candidate? (None without a committed
    select stage, without candidates, or with ``select.k: all``, which is uncurated by design.)

    A k at or below every candidate's score makes the selection the augmented set minus only its
    unscored, flagged and contaminated pairs: M_t then measures no curation, whatever the report's
    row label says. The decision passes unless ``on_unfiltered`` is ``stop``; its outcome,
    ``filtered`` or ``unfiltered``, is said in the log, the summary, the report and MLflow."""
    stats = select.stats if select is not None and select.done else None
    if not stats or stats.get("k") == "all" or not stats.get("candidates") or "below_k" not in stats:
        return None  # (without below_k the selection's stats cannot tell: no guess either way)
    below, capped = stats["below_k"], stats.get("capped") or 0
    candidates, scored = stats["candidates"], stats["candidates"] - (stats.get("unscored") or 0) - (
        stats.get("flagged") or 0)
    k = stats.get("k")
    if below or capped:
        return Decision("curation/filtered", True,
                        f"{below + capped} of {scored} scored candidates left out: {below} below k={_g(k)}"
                        + (f", {capped} beyond select.max_pairs (the lowest scored above k)" if capped else ""),
                        below + capped, None,
                        k if isinstance(k, (int, float)) else None, outcome=FILTERED)
    scores = [r.get("score") for r in read_jsonl(root / select.name / SELECTED)]
    lowest = min((s for s in scores if isinstance(s, (int, float))), default=None)
    return Decision("curation/filtered", on_unfiltered != "stop",
                    f"unfiltered: k={_g(k)} is at or below every scored candidate's score (lowest kept "
                    f"{_g(lowest)}), so iter_{t:02d} kept all {scored} scored of {candidates} candidates: its "
                    f"selection is the augmented data, unfiltered; a higher select.k, or a calibrated k from more "
                    f"curate.calibration_pairs, would filter", 0, None,
                    k if isinstance(k, (int, float)) else None, outcome=UNFILTERED)


def _training_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(segment id, instruction, response) in file order: what fine-tuning reads of a selection."""
    return [(str(r.get("segment_id")), str(r.get("instruction")), str(r.get("response"))) for r in read_jsonl(path)]


def decide_augmentation(stats: dict[str, Any], cfg: RunConfig) -> GateResult:
    """Augmentation's yield alone, decided as soon as the augment stage is committed: a corpus that
    loses too many segments stops the loop there, before M0 is trained or a pair rated. Recorded
    as iteration 1's gate (the first that the candidates feed), not yet evaluated."""
    return decide([augment_yield_check(stats, cfg.gate.max_augment_reject_rate)], baseline=cfg.gate.baseline,
                  evaluated=False)


# --------------------------------------------------------------------------- on a run directory


def decide_iteration(view: RunView, cfg: RunConfig, t: int, evaluated: bool) -> GateResult:
    """Iteration ``t``'s gate, decided from the run directory (so ``humpback gate`` can redo it):
    its data checks and, once ``evaluated``, its regression checks against earlier iterations."""
    it = view.model(f"iter_{t:02d}")
    decisions = data_decisions(it.selection.selected, it.selection.contaminated, it.curation.unscored_rate,
                               min_selected=cfg.gate.min_selected, max_unscored_rate=cfg.gate.max_unscored_rate,
                               max_contamination_rate=cfg.gate.max_contamination_rate)
    changed = selection_change_check(Path(view.root), t, view.stages.get(f"iter_{t:02d}/select"),
                                     view.stages.get(f"iter_{t - 1:02d}/select"))
    if changed is not None:
        decisions.append(changed)
    filtered = curation_filter_check(Path(view.root), t, view.stages.get(f"iter_{t:02d}/select"), cfg.gate.on_unfiltered)
    if filtered is not None:
        decisions.append(filtered)
    augment = view.stages.get("augment")
    if augment is not None:
        decisions.append(augment_yield_check(augment.stats, cfg.gate.max_augment_reject_rate))
    if evaluated and cfg.eval.enabled:
        history = {}
        for i in range(0, t + 1):
            summary = view.model(f"iter_{i:02d}").eval
            if summary is not None:
                history[i] = {name: m for name, m in summary.metrics.items() if m.value is not None}
        g = cfg.gate
        decisions += eval_decisions(history, t, [Rule(r.metric, r.abs_tol) for r in g.metrics], g.baseline,
                                    evidence_for=run_evidence(Path(view.root), t, g.win_rate_signal, g.power),
                                    level=g.level, power=g.power, correction=g.correction,
                                    on_inconclusive=g.on_inconclusive)
    return decide(decisions, baseline=cfg.gate.baseline, evaluated=evaluated)


def run_evidence(root: Path, t: int, win_rate_signal: str, power: float) -> EvidenceFor:
    """Paired differences read from the run directory: the head-to-head judgment of ``iter_t``
    against its baseline for the win rate (when ``win_rate_signal`` is ``head_to_head`` and it was
    judged), else per-item scores of the two evaluations."""
    from evals.item_scores import item_scores, preferences
    from evals.paired import PairingError, one_sample, paired_difference

    def evidence(metric: str, b: int, level: float) -> Evidence | None:
        if metric == WIN_RATE and win_rate_signal == "head_to_head":
            h2h = preferences(head_to_head_file(root, t, b))
            if h2h is not None and h2h.values:
                p = one_sample(h2h.values, 50.0, level=level, power=power, bounds=h2h.bounds)
                return Evidence(p, f"head-to-head vs iter_{b:02d}", 50.0 + p.estimate, 50.0)
        now = item_scores(root / f"iter_{t:02d}" / "eval", metric)
        then = item_scores(root / f"iter_{b:02d}" / "eval", metric)
        if now is None or then is None:
            return None
        differ = [k for k in now.keys_checked if then.keys_checked.get(k, now.keys_checked[k]) != now.keys_checked[k]]
        if differ:
            return None  # same ids, different documents: not paired (the provenance check says why)
        try:
            p = paired_difference(now.values, then.values, level=level, power=power, bounds=now.bounds)
        except PairingError:
            return None
        return Evidence(p, "paired items", sum(now.values.values()) / len(now.values),
                        sum(then.values.values()) / len(then.values))

    return evidence


WIN_RATE = "alpaca_eval/win_rate"


def head_to_head_file(root: Path, t: int, b: int) -> Path:
    """Where the head-to-head stage of ``iter_t`` keeps its judgments against ``iter_b``."""
    return Path(root) / f"iter_{t:02d}" / "head_to_head" / f"vs_iter_{b:02d}" / "annotations.json"


def write_gate(run_root: Path, t: int, result: GateResult) -> None:
    folder = Path(run_root) / f"iter_{t:02d}"
    folder.mkdir(parents=True, exist_ok=True)  # a gate decided after augmentation comes before iter_01's stages
    write_json_atomic(folder / GATE, result.as_dict())
