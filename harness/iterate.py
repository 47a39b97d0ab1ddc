"""The instruction-backtranslation loop, as a list of cached stage calls.

Run as: humpback iterate --config configs/demo.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness import evaluate, gate, stages
from harness.config import RunConfig, dump_config
from harness.head_to_head import head_to_head_stage
from harness.rundir import RunDir, StageResult
from harness.runview import read_run
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline import faults, hardware

log = logging.getLogger(__name__)

STAGES = ("seed", "corpus", "judge_check", "base_eval", "backward", "augment", "finetune", "curate", "select", "eval",
          "head_to_head")
"""Names ``humpback stage`` takes; :func:`stage_name` turns them into run-directory stage names."""


class StopAfter(Exception):
    """Raised internally when ``humpback stage`` has reached the stage it was asked for."""


def stage_name(stage: str, iteration: int | None) -> str:
    """The run-directory name of a ``humpback stage`` name: ``finetune`` and ``eval`` default to
    iteration 0 (M0), ``curate``, ``select`` and ``head_to_head`` to iteration 1; ``base_eval`` is the untuned base
    model's evaluation."""
    if stage in ("finetune", "curate", "select", "eval", "head_to_head"):
        default = 1 if stage in ("curate", "select", "head_to_head") else 0
        return f"iter_{(default if iteration is None else iteration):02d}/{stage}"
    if stage == "base_eval":
        return "base/eval"
    return stage


def planned_stages(cfg: RunConfig, with_eval: bool | None = None) -> list[str]:
    """Every stage the loop runs under ``cfg``, in order; evaluation stages only when
    ``eval.enabled`` (or ``with_eval``) says so."""
    evals = cfg.eval.enabled if with_eval is None else with_eval
    names = ["seed", "corpus"] + (["judge_check", "base/eval"] if evals else []) + ["backward", "augment"]
    for t in range(0, cfg.iterate.iterations + 1):
        names += [f"iter_{t:02d}/{s}" for s in (("finetune",) if t == 0 else ("curate", "select", "finetune"))]
        names += [f"iter_{t:02d}/eval"] if evals else []
        names += [f"iter_{t:02d}/head_to_head"] if evals and t > 0 and cfg.eval.head_to_head else []
    return names


def open_run(cfg: RunConfig, run_dir: str | Path | None) -> RunDir:
    # stages other runs hold under the same key are copied in, not recomputed (run.share_stages_from)
    run = RunDir(run_dir or Path(cfg.run.root) / cfg.run.name, share_from=cfg.run.share_stages_from)
    run.lock()  # before anything is written: a second process on this directory stops here
    write_text_atomic(run.root / "config.yaml", dump_config(cfg))  # humpback report/gate read it any time
    hardware.configure_threads(cfg.engine.threads)
    run.write_env()
    return run


class GateFailed(Exception):
    """An iteration failed its gate; the loop stops and the CLI exits with EXIT_GATE."""

    def __init__(self, iteration: int, result: gate.GateResult):
        self.iteration = iteration
        self.result = result
        lines = [f"iteration {iteration} failed its gate:"] + [f"  - {d.message()}" for d in result.failures()]
        super().__init__("\n".join(lines))


def iterate(cfg: RunConfig, run: RunDir, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage up to ``stop_after`` (all when None); returns the summary.

    Raises:
        GateFailed: an iteration's data or evaluation gate failed (after report and tracking).
    """

    def done(result: StageResult) -> StageResult:
        if result.name == stop_after:
            raise StopAfter(result.name)
        return result

    evals: dict[int, StageResult] = {}

    def score(prefix: str, model: StageResult) -> None:
        if cfg.eval.enabled:
            result = done(evaluate.evaluate_model(run, cfg, prefix, model, check))
            if prefix.startswith("iter_"):
                evals[int(prefix[5:])] = result

    def head_to_head(t: int) -> None:
        if cfg.eval.enabled and cfg.eval.head_to_head:
            done(head_to_head_stage(run, cfg, t, evals, check))

    failure: GateFailed | None = None
    evaluate.check_eval_inputs(cfg)
    try:
        seed = done(stages.prepare_seed(run, cfg))                    # human-written seed pairs
        segments = done(stages.prepare_corpus(run, cfg))              # unlabelled segments
        base = stages.base_model(cfg)
        check = done(evaluate.check_judge_stage(run, cfg)) if cfg.eval.enabled else None
        score("base", base)                                           # the untuned base model
        backward = done(stages.train_backward(run, cfg, seed, base))  # M_yx: response -> instruction
        candidates = done(stages.augment_corpus(run, cfg, seed, segments, backward))  # self-augmentation
        check_augment_gate(run, cfg, candidates)                      # enough usable instructions?
        model = done(stages.train_forward(run, cfg, 0, seed, base, None))       # M0: seed only
        score("iter_00", model)
        for t in range(1, cfg.iterate.iterations + 1):
            scores = done(stages.curate_candidates(run, cfg, t, candidates, model))  # rate with M_{t-1}
            selected = done(stages.select_candidates(run, cfg, t, candidates, scores))  # keep >= k
            data_gate = check_gate(run, cfg, t, evaluated=False)      # enough clean, scored data?
            if stop_at_fixed_point(cfg, t, data_gate):                # the same data as M_{t-1}?
                break
            model = done(stages.train_forward(run, cfg, t, seed, base, selected))    # M_t
            score(f"iter_{t:02d}", model)
            head_to_head(t)                                           # M_t vs M_{t-1} and M0, same prompts
            check_gate(run, cfg, t, evaluated=True)                   # no regression beyond noise?
    except StopAfter:
        pass
    except GateFailed as exc:
        failure = exc
    summary = summarize(run, cfg)
    write_json_atomic(run.root / "summary.json", summary)
    if stop_after is None:
        finish(run.root, cfg)
    if failure is not None:
        raise failure
    return summary


def check_gate(run: RunDir, cfg: RunConfig, t: int, evaluated: bool) -> gate.GateResult | None:
    if not cfg.gate.enabled:
        return None
    result = gate.decide_iteration(read_run(run.root, strict=True), cfg, t, evaluated)
    gate.write_gate(run.root, t, result)
    for d in result.decisions:
        loud = not d.passed or d.outcome in (gate.INCONCLUSIVE, gate.UNFILTERED) or d.blind
        (log.warning if loud else log.info)("gate iter_%02d %s: %s", t, "pass" if d.passed else "FAIL", d.message())
    if not result.passed:
        raise GateFailed(t, result)
    return result


def stop_at_fixed_point(cfg: RunConfig, t: int, result: gate.GateResult | None) -> bool:
    """True where iteration ``t`` selected exactly the previous iteration's data and
    ``gate.stop_at_fixed_point`` ends the loop there (M_t would repeat M_{t-1})."""
    fixed = result.fixed_point() if result is not None else None
    if fixed is None:
        return False
    if cfg.gate.stop_at_fixed_point:
        log.warning("iter_%02d: %s; the loop ends here, with M_%d as its last model (gate.stop_at_fixed_point)",
                    t, fixed.reason, t - 1)
        return True
    log.warning("iter_%02d: %s; going on anyway (gate.stop_at_fixed_point=false)", t, fixed.reason)
    return False


def check_augment_gate(run: RunDir, cfg: RunConfig, augmented: StageResult) -> None:
    """Augmentation's yield, checked as soon as it is known rather than after curation: above
    ``gate.max_augment_reject_rate`` the loop stops, and ``iter_01/gate.json`` says why."""
    if not cfg.gate.enabled:
        return
    result = gate.decide_augmentation(augmented.stats, cfg)
    for d in result.decisions:
        (log.info if d.passed else log.warning)("gate augment %s: %s", "pass" if d.passed else "FAIL", d.message())
    if not result.passed:
        gate.write_gate(run.root, 1, result)
        raise GateFailed(1, result)


def finish(run_root: Path, cfg: RunConfig) -> None:
    """Write the report and mirror the run into MLflow; neither may lose the run's results."""
    from harness import report

    view = None  # read once, for both
    try:
        view = read_run(run_root)
        report.write_report(view)
    except Exception as exc:  # noqa: BLE001 - a broken plot must not hide a finished run
        if faults.write_error(exc) is not None:
            raise  # a full or read-only disk: the command says so (exit status 6); a rerun writes it
        log.exception("writing the report failed; the run directory is complete")
    if (cfg.tracking.uri or "").lower() == "off":
        return
    try:
        from harness import tracking

        tracking.log_run(view or run_root, tracking_uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                         register_model_name=cfg.tracking.register_model)
    except Exception:  # noqa: BLE001 - the run directory stays the source of truth
        log.exception("MLflow logging failed; the run directory is complete and 'humpback report' can redo it")


def summarize(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """Per-stage counts and timings from the committed stages' manifests, and per-iteration summaries."""
    view = read_run(run.root)
    out: dict[str, Any] = {"run_dir": str(run.root), "stages": {}, "iterations": {}}
    for name in planned_stages(cfg, with_eval=True):
        stage = view.stages.get(name)
        if stage is None or not stage.done:
            continue
        out["stages"][name] = {"seconds": stage.seconds, "stats": stage.stats}
    for t in range(0, cfg.iterate.iterations + 1):
        it = {k.split("/")[1]: v["stats"] for k, v in out["stages"].items() if k.startswith(f"iter_{t:02d}/")}
        if not it:
            continue
        summary = {
            "iteration": t,
            "score_histogram": it.get("curate", {}).get("histogram"),
            "unscored_rate": it.get("curate", {}).get("unscored_rate"),
            "selected": it.get("select", {}).get("selected"),
            "keep_rate": it.get("select", {}).get("keep_rate"),
            "train_pairs": it.get("finetune", {}).get("train_pairs"),
            "final_loss": it.get("finetune", {}).get("final_loss"),
        }
        write_json_atomic(run.root / f"iter_{t:02d}" / "summary.json", summary)
        out["iterations"][t] = summary
    for name, model in view.models.items():
        fixed = model.gate.fixed_point() if model.gate is not None else None
        if fixed is not None and cfg.gate.stop_at_fixed_point:
            out["stopped"] = {"iteration": int(name[5:]), "reason": fixed.reason}
        unfiltered = model.gate.unfiltered() if model.gate is not None else None
        if unfiltered is not None:
            out.setdefault("unfiltered", []).append({"iteration": int(name[5:]), "reason": unfiltered.reason})
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run directory: {summary['run_dir']}", "", f"{'stage':<20} {'seconds':>8}  counts"]
    for name, info in summary["stages"].items():
        stats = info["stats"]
        keys = ("kept", "rejected", "segments", "removed", "generated", "histogram", "unscored", "selected",
                "keep_rate", "contaminated", "train_pairs", "steps", "final_loss", "truncated", "accuracy",
                "position_bias", "trusted")
        counts = ", ".join(f"{k}={json.dumps(stats[k])}" for k in keys if k in stats)
        lines.append(f"{name:<20} {info['seconds']:>8.1f}  {counts}")
    for note in summary.get("unfiltered", []):
        lines += ["", f"iter_{note['iteration']:02d}'s curation filtered nothing: {note['reason']}"]
    if "stopped" in summary:
        stop = summary["stopped"]
        lines += ["", f"the loop ended at iter_{stop['iteration']:02d}, before fine-tuning: {stop['reason']}"]
    return "\n".join(lines)
