"""Evaluation stages: every model the loop makes is scored, with provenance on every number.

``judge_check`` measures the AlpacaEval judge once per run on pairs whose better answer is
known; ``<model>/eval`` scores one model on AlpacaEval (against the configured reference, with
that judge) and on the held-out lm-eval tasks, and writes ``summary.json``:
``{"model", "metrics": {name: {value, stderr, n, higher_is_better, trusted, provenance}},
"judge_check", "seconds"}``. The provenance deliberately leaves the evaluated model out, so two
models' numbers compare exactly when everything else about their evaluation was the same.

Run as: humpback eval --model PATH_OR_ID --config FILE
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from harness import stages
from harness.config import RunConfig, settings_digest
from harness.rundir import RunDir, StageContext, StageResult, write_json_atomic
from pipeline.io import write_jsonl
from pipeline.models import resolve_base

log = logging.getLogger(__name__)


def judge_model_spec(cfg: RunConfig) -> str:
    return cfg.eval.judge_model or cfg.model.base


def eval_settings(cfg: RunConfig) -> dict[str, Any]:
    """What defines an evaluation, apart from the model evaluated."""
    ev = cfg.eval.model_dump()
    keep = ("data_dir", "seed", "batch_size", "max_new_tokens", "alpaca_subset", "alpaca_reference", "judge",
            "heldout_tasks", "heldout_limit", "alpaca_lc_data_dir", "alpaca_lc_download", "alpaca_lc_glm")
    return {**{k: ev[k] for k in keep}, "judge_model": judge_model_spec(cfg), "system": stages.system_prompt(cfg)}


def check_judge_stage(run: RunDir, cfg: RunConfig) -> StageResult:
    from evals import alpaca

    ev = cfg.eval

    def fn(ctx: StageContext) -> dict[str, Any]:
        instructions = alpaca.load_instruction_set(ev.data_dir, ev.alpaca_reference, None, ev.seed)
        judge = alpaca.Judge(ev.judge, _judge_model(cfg), batch_size=ev.batch_size)
        result = alpaca.check_judge(judge, instructions.reference, n=ev.judge_check_pairs, seed=ev.seed,
                                    min_accuracy=ev.min_judge_accuracy, out_dir=ctx.work)
        # Timings go to logs/ (outside the output digest): evaluations depend on this stage.
        timing = {k: result.pop(k) for k in list(result) if "seconds" in k}
        (ctx.work / "logs").mkdir(exist_ok=True)
        write_json_atomic(ctx.work / "logs" / "timing.json", timing)
        write_json_atomic(ctx.work / "judge_check.json", result)
        return {k: result.get(k) for k in ("accuracy", "position_bias", "trusted", "n_judgments", "mean_p_correct")}

    settings = {"judge": ev.judge, "judge_model": judge_model_spec(cfg), "pairs": ev.judge_check_pairs,
                "seed": ev.seed, "min_accuracy": ev.min_judge_accuracy, "reference": ev.alpaca_reference,
                "data_dir": ev.data_dir}
    return run.stage("judge_check", fn, version="judge_check_v1", settings=settings)


def _judge_model(cfg: RunConfig) -> str | None:
    from evals import alpaca

    if not alpaca.Judge(cfg.eval.judge).needs_engine:
        return None
    return resolve_base(judge_model_spec(cfg))


def evaluate_model(run: RunDir, cfg: RunConfig, prefix: str, model: StageResult, judge_check: StageResult) -> StageResult:
    """Stage ``<prefix>/eval``: AlpacaEval and held-out tasks for one model."""
    settings = eval_settings(cfg)

    def fn(ctx: StageContext) -> dict[str, Any]:
        started = time.time()
        path = stages.model_path(ctx.inputs["model"])
        check = ctx.inputs["judge_check"].stats
        metrics = _alpaca_metrics(cfg, prefix, path, ctx.work / "alpaca", run.root / "cache", check, settings)
        metrics.update(_heldout_metrics(cfg, path, ctx.work / "heldout", settings))
        summary = {"model": ctx.inputs["model"].name, "metrics": metrics, "judge_check": check,
                   "seconds": round(time.time() - started, 1)}
        write_json_atomic(ctx.work / "summary.json", summary)
        return {"metrics": {k: v["value"] for k, v in metrics.items()}, "judge_trusted": check.get("trusted")}

    return run.stage(f"{prefix}/eval", fn, version="eval_v1", settings=settings,
                     inputs={"model": model, "judge_check": judge_check})


def _alpaca_metrics(cfg, prefix, model_path, out_dir: Path, cache: Path, check: dict, settings: dict) -> dict:
    from evals import alpaca

    ev = cfg.eval
    instructions = alpaca.load_instruction_set(ev.data_dir, ev.alpaca_reference, ev.alpaca_subset, ev.seed)
    engine = stages.make_engine(model_path, cfg, ev.batch_size)
    outputs = alpaca.generate_answers(engine, instructions.instructions, generator=prefix,
                                      system_prompt=stages.system_prompt(cfg), max_new_tokens=ev.max_new_tokens,
                                      seed=ev.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "model_outputs.jsonl", outputs)
    del engine  # free the model before the judge loads
    judge = alpaca.Judge(ev.judge, _judge_model(cfg), batch_size=ev.batch_size)
    result = alpaca.score_alpaca_eval(outputs, instructions, out_dir, judge=judge, cache_dir=cache,
                                      lc_data_dir=ev.alpaca_lc_data_dir, lc_download=ev.alpaca_lc_download,
                                      lc_glm=ev.alpaca_lc_glm)
    provenance = {"eval_config": settings_digest(settings), "judge": judge.identity(),
                  "reference": instructions.provenance().get("reference")}
    trusted = bool(check.get("trusted"))
    metrics = {
        "alpaca_eval/win_rate": _metric(result["win_rate"], result.get("standard_error"), result["n"], provenance, trusted),
        "alpaca_eval/avg_length": _metric(result["avg_length"], None, result["n"], provenance, True, higher=False),
    }
    if result.get("length_controlled_win_rate") is not None:
        metrics["alpaca_eval/lc_win_rate"] = _metric(result["length_controlled_win_rate"], result.get("lc_standard_error"),
                                                     result["n"], {**provenance, "lc_glm": result["lc_glm"]}, trusted)
        if result.get("lc_unavailable_reason"):
            log.info("AlpacaEval LC win rate: %s, %s", result["lc_glm"], result["lc_unavailable_reason"])
    else:
        log.info("AlpacaEval LC win rate unavailable: %s", result.get("lc_unavailable_reason"))
    return metrics


def _heldout_metrics(cfg, model_path: str, out_dir: Path, settings: dict) -> dict:
    from evals.heldout import run_heldout

    ev = cfg.eval
    if not ev.heldout_tasks:
        return {}
    device = cfg.engine.device if cfg.engine.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_heldout(model_path, out_dir, data_dir=ev.data_dir, tasks=ev.heldout_tasks, limit=ev.heldout_limit,
                         seed=ev.seed, batch_size=ev.batch_size, system_prompt=stages.system_prompt(cfg),
                         max_gen_toks=ev.max_new_tokens, device=device)
    return {
        name: _metric(m["value"], m.get("stderr"), m.get("n"),
                      {"eval_config": settings_digest(settings), "task_version": m.get("task_version")},
                      True, higher=m.get("higher_is_better", True))
        for name, m in result["metrics"].items()
    }


def _metric(value, stderr, n, provenance: dict, trusted: bool, higher: bool = True) -> dict[str, Any]:
    return {"value": value, "stderr": stderr, "n": n, "higher_is_better": higher, "trusted": trusted,
            "provenance": provenance}


def evaluate_standalone(cfg: RunConfig, model_spec: str, out: str | Path | None) -> dict[str, Any]:
    """``humpback eval``: one model, the same layout as inside a run (``judge_check/``,
    ``model/eval/summary.json``) in a directory of its own."""
    name = Path(model_spec.rstrip("/")).name.replace(".gguf", "") or "model"
    run = RunDir(out or Path(cfg.run.root) / f"eval-{name}")
    model = stages.model_input(model_spec, cfg.model.revision, name="model")
    check = check_judge_stage(run, cfg)
    result = evaluate_model(run, cfg, "model", model, check)
    return json.loads((result.path / "summary.json").read_text())


def check_eval_inputs(cfg: RunConfig) -> None:
    """Fail before any work when evaluation data is missing, rather than after training.

    Raises:
        DataError: naming what is missing and the settings that fix it.
    """
    from evals import alpaca
    from evals.heldout import HeldoutError, data_files
    from pipeline.data import DataError

    ev = cfg.eval
    if not ev.enabled:
        return
    hint = ("set eval.data_dir to a folder laid out like ../shared/data (alpaca_eval/, heldout/), "
            "or eval.enabled=false to run the pipeline without evaluation")
    if ev.data_dir is None or not Path(ev.data_dir).is_dir():
        raise DataError(f"evaluation data directory {ev.data_dir!r} does not exist: {hint}")
    try:
        _, path = alpaca._reference_path(alpaca._alpaca_eval_dir(ev.data_dir), ev.alpaca_reference)
        if not path.is_file():
            raise DataError(f"AlpacaEval reference outputs not found: {path}: {hint}")
        if ev.heldout_tasks:
            data_files(ev.heldout_tasks, Path(ev.data_dir))
    except (HeldoutError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{exc}: {hint}") from exc
