"""``humpback eval-size``: how many evaluation items a target detectable effect needs, and what
that costs, planned from a finished run.

A gate can only see changes larger than its minimum detectable effect (MDE), which shrinks with
the square root of the items evaluated. From a run's last iteration this reads, per metric, the
spread of the per-item differences against the iteration before (the same numbers its gate
used), inverts the MDE for the requested effect, caps it at the task's size, and prices it with
the run's own seconds per evaluated item; with ``--minutes`` it also says what fits.

Run as: humpback eval-size runs/demo --effect alpaca_eval/win_rate=5 --minutes 60
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.paired import corrected_level, items_needed

FULL_SIZES = {"alpaca_eval": 805, "ifeval": 541, "truthfulqa_mc1": 817, "truthfulqa_mc2": 817, "gsm8k": 1319}
"""Items per task in the ``full`` profile (eval.profile: full)."""


@dataclass(frozen=True)
class SizeRow:
    metric: str
    effect: float
    n_now: int
    mde_now: float | None
    sd: float | None
    n_needed: int | None
    n_full: int | None
    signal: str
    note: str = ""
    n_worst: int | None = None
    """Items needed if every item moved as much as it can (the largest spread the metric's range
    allows): a bound that holds whatever the models do."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval-size", help="items needed for a target detectable effect, and their cost, planned from a run",
        description="Read a finished run's last iteration, and for each metric (default: the gated ones, at their "
                    "tolerance) print the items its evaluation needs for the given minimum detectable effect "
                    "(gate.power, gate.level with the gate's correction), capped at the task's full size, the "
                    "seconds one model's evaluation would take at that size (from this run's own timing), and the "
                    "overrides that ask for it. The spread of the per-item differences is the one measured between "
                    "the run's last two iterations (head to head for the win rate).")
    p.add_argument("run_dir")
    p.add_argument("--effect", action="append", default=[], metavar="METRIC=DELTA",
                   help="target MDE in the metric's units, e.g. alpaca_eval/win_rate=5 (repeatable)")
    p.add_argument("--minutes", type=float, help="time budget for one model's evaluation")


def plan(run_dir: str | Path, effects: dict[str, float] | None = None) -> dict[str, Any]:
    """The rows and the timing behind ``humpback eval-size``."""
    from harness.config import load_config
    from harness.gate import run_evidence
    from harness.runview import read_run

    view = read_run(run_dir)
    root = Path(view.root)
    cfg = load_config(root / "config.yaml")
    done = [m.iteration for m in view.models.values() if m.iteration is not None and m.eval is not None]
    if len(done) < 2:
        raise ValueError(f"{root}: needs two evaluated iterations (iter_00 and iter_01 at least) to measure spreads")
    t, b = max(done), max(i for i in done if i < max(done))
    wanted = effects or {r.metric: r.abs_tol for r in cfg.gate.metrics}
    level = corrected_level(cfg.gate.level, len(wanted)) if cfg.gate.correction == "bonferroni" else cfg.gate.level
    evidence = run_evidence(root, t, cfg.gate.win_rate_signal, cfg.gate.power)
    rows = []
    for metric, effect in wanted.items():
        ev = evidence(metric, b, level)
        full = FULL_SIZES.get(metric.split("/")[0])
        if ev is None:
            rows.append(SizeRow(metric, effect, 0, None, None, None, full, "-", "no per-item scores in this run"))
            continue
        p = ev.paired
        need = items_needed(p.sd, effect, level, cfg.gate.power, normal=p.method != "t") if p.sd else None
        notes = []
        if p.changed == 0:
            notes.append("no item changed between the two iterations: the spread is the pseudo-items' floor")
        if need is not None and full is not None and need > full:
            notes.append(f"more than the task's {full} items")
        worst = _largest_spread(root / f"iter_{t:02d}" / "eval", metric, ev.signal)
        n_worst = items_needed(worst, effect, level, cfg.gate.power) if worst else None
        rows.append(SizeRow(metric, effect, p.n, p.mde, p.sd, need, full, f"{ev.signal} (iter_{t:02d})",
                            "; ".join(notes), n_worst))
    return {"rows": rows, "level": level, "power": cfg.gate.power, "timing": _timing(root / f"iter_{t:02d}" / "eval"),
            "iteration": t, "baseline": b}


def _largest_spread(eval_dir: Path, metric: str, signal: str) -> float | None:
    """The largest standard deviation a per-item difference of ``metric`` can have: a head-to-head
    preference (0-100 around 50) at most 50; a difference of two scores in [lo, hi] at most hi - lo."""
    from evals.item_scores import item_scores

    if signal.startswith("head-to-head"):
        return 50.0
    scores = item_scores(eval_dir, metric)
    if scores is None or scores.bounds is None:
        return None
    return float(scores.bounds[1] - scores.bounds[0])


def _timing(eval_dir: Path) -> dict[str, float | None]:
    """Seconds per AlpacaEval prompt (answering and judging) and per held-out document, from one
    evaluation's own summary files."""
    def load(path: Path) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    total = load(eval_dir / "summary.json").get("seconds")
    heldout = load(eval_dir / "heldout" / "summary.json")
    alpaca = load(eval_dir / "alpaca" / "alpaca_eval.json")
    heldout_s = heldout.get("seconds") or 0.0
    tasks = {m.get("task"): m.get("n") or 0 for m in (heldout.get("metrics") or {}).values()}
    docs = sum(tasks.values())
    prompts = alpaca.get("n")
    alpaca_s = (total - heldout_s) if isinstance(total, (int, float)) else None
    return {"per_prompt": alpaca_s / prompts if alpaca_s and prompts else None,
            "per_document": heldout_s / docs if heldout_s and docs else None, "tasks": len(tasks)}


def format_plan(result: dict[str, Any], minutes: float | None = None) -> str:
    rows, timing = result["rows"], result["timing"]
    lines = [f"Planned from iter_{result['iteration']:02d} against iter_{result['baseline']:02d}; intervals at "
             f"{result['level']:.1%} (gate.level, corrected), power {result['power']:.0%}.", ""]
    header = ["metric", "target MDE", "n now", "MDE now", "n needed", "n, worst case", "full size", "note"]
    table = [[r.metric, f"{r.effect:g}", str(r.n_now), _g(r.mde_now), _g(r.n_needed), _g(r.n_worst), _g(r.n_full),
              r.note] for r in rows]
    widths = [max(len(x[i]) for x in [header, *table]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *table]]
    alpaca_n = max([min(r.n_needed, r.n_full or r.n_needed) for r in rows
                    if r.n_needed and r.metric.startswith("alpaca_eval/")], default=None)
    heldout_n = max([min(r.n_needed, r.n_full or r.n_needed) for r in rows
                     if r.n_needed and not r.metric.startswith("alpaca_eval/")], default=None)
    # every held-out task is evaluated at eval.heldout_limit documents, gated or not
    seconds = (alpaca_n or 0) * (timing["per_prompt"] or 0) + \
        (heldout_n or 0) * (timing["per_document"] or 0) * max(1, timing["tasks"] or 1)
    overrides = ([f"eval.alpaca_subset={alpaca_n}"] if alpaca_n else []) + (
        [f"eval.heldout_limit={heldout_n}"] if heldout_n else [])
    lines += ["", "n needed: from the spread of the per-item differences this run measured (at a handful of items "
                  "rough itself: re-plan from a run at the new size); n, worst case: if every item moved as much as "
                  "the metric's range allows, a bound whatever the models do.",
              f"this run's cost: {_g(timing['per_prompt'])} s per AlpacaEval prompt (answer and judgments), "
                  f"{_g(timing['per_document'])} s per held-out document",
              f"at the sizes needed: about {seconds / 60:.1f} min per model evaluation"
              + (f" ({' '.join(overrides)})" if overrides else "")]
    if minutes is not None and seconds > 0:
        if seconds <= minutes * 60:
            lines.append(f"fits the budget of {minutes:g} min")
        else:
            shrink = minutes * 60 / seconds
            lines.append(f"over the budget of {minutes:g} min: at {shrink:.0%} of those sizes each MDE grows by "
                         f"{1 / math.sqrt(shrink):.2f}x")
    return "\n".join(lines)


def _g(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def run(args) -> int:
    effects = {}
    for item in args.effect:
        metric, _, value = item.partition("=")
        try:
            effects[metric] = float(value)
        except ValueError:
            print(f"error: --effect {item!r}: expected METRIC=NUMBER, e.g. alpaca_eval/win_rate=5", file=sys.stderr)
            return 2
    try:
        result = plan(args.run_dir, effects or None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(format_plan(result, args.minutes))
    return 0
