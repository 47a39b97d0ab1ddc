"""Evaluation stages: every model the loop makes is scored, with provenance on every number.

``judge_check`` measures the AlpacaEval judge once per run against outside labels (human and
GPT-4 preferences; that decides whether its win rates are trusted) and on planted pairs (a
sanity check); ``<model>/eval`` scores one model on AlpacaEval (against the configured reference, with
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
from functools import partial
from pathlib import Path
from typing import Any

from harness import stages
from harness.config import RunConfig
from pipeline.digests import settings_digest
from harness.rundir import RunDir, StageContext, StageResult
from pipeline.io import write_json_atomic
from pipeline.memory import release_memory
from pipeline import faults, hardware
from pipeline.io import write_jsonl
from pipeline.models import resolve_base

log = logging.getLogger(__name__)


def judge_model_spec(cfg: RunConfig) -> str:
    return cfg.eval.judge_model or cfg.model.base


def eval_settings(cfg: RunConfig) -> dict[str, Any]:
    """What defines an evaluation, apart from the model evaluated.

    Settings that change nothing about it stay out: the hub's when the reference is read locally
    and no hub task is evaluated, and who answers held-out generations when there are no
    held-out tasks."""
    ev = cfg.eval.model_dump()
    keep = ("data_dir", "seed", "batch_size", "max_new_tokens", "alpaca_subset", "alpaca_reference", "judge",
            "heldout_tasks", "heldout_limit", "heldout_batch_size", "alpaca_lc_data_dir", "alpaca_lc_download",
            "alpaca_lc_glm", "dtype", "judge_orders")
    out = {**{k: ev[k] for k in keep}, "judge_model": judge_model_spec(cfg), "system": stages.system_prompt(cfg)}
    if ev["heldout_tasks"] or ev["heldout_hub_tasks"]:
        # The engine's answers to lm-eval's requests carry a version of their own.
        out["heldout_generation"] = "engine_v1" if ev["heldout_generation"] == "engine" else "lm_eval"
    return {**out, **_alpaca_source_settings(cfg), **_hub_task_settings(cfg), **stages.backend_settings(cfg)}


def _alpaca_source_settings(cfg: RunConfig) -> dict[str, Any]:
    """``alpaca_source``/``alpaca_hub_revision`` when the reference comes from the hub (decided
    from the file system, without downloading)."""
    from evals import sources

    ev = cfg.eval
    if sources.planned_kind(ev.data_dir, ev.alpaca_reference, ev.alpaca_source) != "hub":
        return {}
    return {"alpaca_source": "hub", "alpaca_hub_revision": ev.alpaca_hub_revision}


def _hub_task_settings(cfg: RunConfig) -> dict[str, Any]:
    ev = cfg.eval
    if not ev.heldout_hub_tasks:
        return {}
    return {"heldout_hub_tasks": list(ev.heldout_hub_tasks),
            "heldout_hub_num_fewshot": dict(ev.heldout_hub_num_fewshot)}


def _instruction_set(cfg: RunConfig, subset: int | None):
    from evals import alpaca

    ev = cfg.eval
    return alpaca.load_instruction_set(ev.data_dir, ev.alpaca_reference, subset, ev.seed, source=ev.alpaca_source,
                                       hub_revision=ev.alpaca_hub_revision)


def check_judge_stage(run: RunDir, cfg: RunConfig) -> StageResult:
    """Stage ``judge_check``: the judge calibrated on outside labels (the trust decision, see
    :mod:`evals.calibration.judge_eval`) and the planted-pairs sanity check."""
    from evals import alpaca
    from harness.calibration import calibrate_judge, headline

    ev = cfg.eval

    def fn(ctx: StageContext) -> dict[str, Any]:
        instructions = _instruction_set(cfg, None)
        judge = make_judge(cfg)
        planted = alpaca.check_judge(judge, instructions.reference, n=ev.judge_check_pairs, seed=ev.seed,
                                     min_accuracy=ev.min_judge_accuracy, out_dir=ctx.work)
        faults.checkpoint("judge_check.planted")
        calibration = calibrate_judge(judge, cfg)
        # Timings go to logs/ (outside the output digest): evaluations depend on this stage.
        # (how many judgments the cache already held differs after a resume, not the result: timing too)
        timing = {k: planted.pop(k) for k in list(planted) if "seconds" in k or k == "judged_now"}
        timing["calibration"] = calibration.pop("timing")
        (ctx.work / "logs").mkdir(exist_ok=True)
        write_json_atomic(ctx.work / "logs" / "timing.json", timing)
        write_json_atomic(ctx.work / "judge_check.json", planted)
        write_json_atomic(ctx.work / "calibration.json", calibration)
        stats = {"planted_accuracy": planted["accuracy"], "position_bias": planted["position_bias"],
                 "planted_passed": planted["trusted"], "n_judgments": planted["n_judgments"],
                 **headline(calibration)}
        if ev.judge_trust == "assumed":
            stats.update(trusted=True, verdict=f"trust assumed by configuration (eval.judge_trust=assumed), not "
                                               f"measured; the calibration said: {calibration['verdict']}")
        return stats

    return run.stage("judge_check", fn, version="judge_check_v5", settings=judge_check_settings(cfg))


def judge_check_settings(cfg: RunConfig) -> dict[str, Any]:
    """What defines the judge check."""
    ev = cfg.eval
    return {"judge": ev.judge, "judge_model": judge_model_spec(cfg), "pairs": ev.judge_check_pairs,
            "seed": ev.seed, "min_accuracy": ev.min_judge_accuracy, "reference": ev.alpaca_reference,
            "data_dir": ev.data_dir, "dtype": ev.dtype, "calibration_sources": list(ev.calibration_sources),
            "calibration_pairs": ev.judge_calibration_pairs, "trust_margin": ev.judge_trust_margin,
            "trust": ev.judge_trust,
            **_alpaca_source_settings(cfg)}


def make_judge(cfg: RunConfig):
    """The configured AlpacaEval judge (its engine loads on first use)."""
    from evals import alpaca

    ev = cfg.eval
    return alpaca.Judge(ev.judge, _judge_model(cfg), batch_size=ev.batch_size, device=stages.engine_device(cfg),
                        dtype=ev.dtype)


def _judge_model(cfg: RunConfig) -> str | None:
    from evals import alpaca

    if not alpaca.Judge(cfg.eval.judge).needs_engine():
        return None
    return resolve_base(judge_model_spec(cfg))


def evaluate_model(run: RunDir, cfg: RunConfig, prefix: str, model: StageResult, judge_check: StageResult) -> StageResult:
    """Stage ``<prefix>/eval``: AlpacaEval and held-out tasks for one model."""
    settings = eval_settings(cfg)

    def fn(ctx: StageContext) -> dict[str, Any]:
        started = time.time()
        path = stages.model_path(ctx.inputs["model"])
        check = ctx.inputs["judge_check"].stats
        metrics = _alpaca_metrics(cfg, prefix, path, ctx.work / "alpaca", run.root / "cache", check, settings,
                                  scratch=ctx.scratch)
        faults.checkpoint("eval.judged")
        release_memory()  # the answering model and the judge are gone: return their pages first
        metrics.update(_heldout_metrics(cfg, path, ctx.work, settings))
        faults.checkpoint("eval.heldout")
        summary = {"model": ctx.inputs["model"].name, "metrics": metrics, "judge_check": check,
                   "seconds": round(time.time() - started, 1)}
        write_json_atomic(ctx.work / "summary.json", summary)
        return {"metrics": {k: v["value"] for k, v in metrics.items()}, "judge_trusted": check.get("trusted")}

    return run.stage(f"{prefix}/eval", fn, version="eval_v4", settings=settings,
                     inputs={"model": model, "judge_check": judge_check})


ANSWER_CHUNK_BATCHES = 4
"""With ``engine.workers`` > 1 the AlpacaEval answers are made, and committed, in chunks of this
many ``eval.batch_size`` batches (a number that does not depend on the workers, so a resumed
stage finds the same chunks whatever their count)."""


def _alpaca_metrics(cfg, prefix, model_path, out_dir: Path, cache: Path, check: dict, settings: dict, *,
                    scratch: Path) -> dict:
    from evals import alpaca

    ev = cfg.eval
    instructions = _instruction_set(cfg, ev.alpaca_subset)
    answer = partial(_answer_chunk, prefix, stages.system_prompt(cfg), ev.max_new_tokens, ev.seed)
    with stages.engine_pool(model_path, cfg, ev.batch_size) as pool:
        if cfg.engine.workers == 1:
            outputs = pool.call(lambda engine: answer(engine, 0, instructions.instructions))
        else:
            outputs = pool.map_chunks(instructions.instructions, answer, work=scratch / "answers",
                                      chunk_size=ANSWER_CHUNK_BATCHES * ev.batch_size, desc=f"{prefix} answers")
    # the answering model is gone (the pool is closed) before the judge loads
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "model_outputs.jsonl", outputs)
    faults.checkpoint("eval.answers", out_dir / "model_outputs.jsonl")
    judge = make_judge(cfg)
    result = alpaca.score_alpaca_eval(outputs, instructions, out_dir, judge=judge, cache_dir=cache,
                                      lc_data_dir=ev.alpaca_lc_data_dir, lc_download=ev.alpaca_lc_download,
                                      lc_glm=ev.alpaca_lc_glm, both_orders=ev.judge_orders == "both")
    reference = instructions.provenance()
    provenance = {"eval_config": settings_digest(settings), "judge": judge.identity(),
                  "reference": reference["reference"]}
    if reference["reference_source"] == "hub":
        # The hub file can change between iterations of one run: numbers made against different
        # files must not be compared, so its content is part of the provenance.
        provenance.update(reference_source="hub", reference_sha256=reference["reference_sha256"])
    trusted = bool(check.get("trusted"))
    metrics = {
        "alpaca_eval/win_rate": _metric(result["win_rate"], result.get("standard_error"), result["n"], provenance, trusted),
        "alpaca_eval/avg_length": _metric(result["avg_length"], None, result["n"], provenance, True, higher=False),
        # answers in which planted judge-addressed text was found and not shown to the judge
        "alpaca_eval/planted_answers": _metric(result["planted"]["model_outputs"]["flagged"], None, result["n"],
                                               provenance, True, higher=False),
    }
    if result.get("length_controlled_win_rate") is not None:
        metrics["alpaca_eval/lc_win_rate"] = _metric(result["length_controlled_win_rate"], result.get("lc_standard_error"),
                                                     result["n"], {**provenance, "lc_glm": result["lc_glm"]}, trusted)
        if result.get("lc_unavailable_reason"):
            log.info("AlpacaEval LC win rate: %s, %s", result["lc_glm"], result["lc_unavailable_reason"])
    else:
        log.info("AlpacaEval LC win rate unavailable: %s", result.get("lc_unavailable_reason"))
    return metrics


def _answer_chunk(generator: str, system: str | None, max_new_tokens: int, seed: int, engine, index: int,
                  chunk) -> list[dict[str, Any]]:
    """AlpacaEval answers to some of the instructions: greedy, so every chunk takes the same seed."""
    from evals import alpaca

    return alpaca.generate_answers(engine, chunk, generator=generator, system_prompt=system,
                                   max_new_tokens=max_new_tokens, seed=seed)


def _heldout_metrics(cfg, model_path: str, work: Path, settings: dict) -> dict:
    """Local held-out tasks (``work/heldout/``) and lm-eval hub tasks (``work/heldout_hub/``) on one
    loaded model; hub tasks are validated and their data fetched before the model loads."""
    from evals import heldout, hub_tasks, lm_eval_runner

    ev = cfg.eval
    if not ev.heldout_tasks and not ev.heldout_hub_tasks:
        return {}
    device = stages.engine_device(cfg)
    plan = None
    if ev.heldout_hub_tasks:
        plan = hub_tasks.prepare_hub_tasks(ev.heldout_hub_tasks, limit=ev.heldout_limit, seed=ev.seed,
                                           num_fewshot=ev.heldout_hub_num_fewshot)
        clash = sorted(set(plan.reported_tasks()) & {*ev.heldout_tasks, "alpaca_eval"})
        if clash:
            raise hub_tasks.HubTaskError(f"eval.heldout_hub_tasks would report metrics under {clash}, which the local "
                                         f"evaluations already use; drop them from one of the lists")
    batch_size = ev.heldout_batch_size or ev.batch_size
    # The engine's generation batches are AlpacaEval's answering batches (eval.batch_size); the
    # held-out batch size is for lm-eval's log-likelihood logits.
    shared = lm_eval_runner.SharedLM(lm_eval_runner.resolve_model(model_path), batch_size=batch_size, device=device,
                                     generation=ev.heldout_generation, engine_batch_size=ev.batch_size,
                                     kv_cache_gib=cfg.engine.kv_cache_gib, dtype=ev.dtype)
    digest = settings_digest(settings)
    metrics: dict[str, Any] = {}
    if ev.heldout_tasks:
        result = heldout.run_heldout(model_path, work / "heldout", data_dir=ev.data_dir, tasks=ev.heldout_tasks,
                                     limit=ev.heldout_limit, seed=ev.seed, batch_size=batch_size,
                                     system_prompt=stages.system_prompt(cfg), max_gen_toks=ev.max_new_tokens,
                                     device=device, shared_lm=shared, generation=ev.heldout_generation,
                                     dtype=ev.dtype)
        metrics.update({
            name: _metric(m["value"], m.get("stderr"), m.get("n"),
                          {"eval_config": digest, "task_version": m.get("task_version")},
                          True, higher=m.get("higher_is_better", True))
            for name, m in result["metrics"].items()
        })
    if plan is not None:
        result = hub_tasks.run_hub_tasks(model_path, work / "heldout_hub", plan, batch_size=batch_size,
                                         system_prompt=stages.system_prompt(cfg), device=device, shared_lm=shared,
                                         generation=ev.heldout_generation, dtype=ev.dtype)
        metrics.update({
            name: _metric(m["value"], m.get("stderr"), m.get("n"),
                          {"eval_config": digest, "task_version": m.get("task_version"), "source": m["source"],
                           "data": hub_tasks.data_digest(plan, m["task"])},
                          True, higher=m.get("higher_is_better", True))
            for name, m in result["metrics"].items()
        })
    return metrics


def _metric(value, stderr, n, provenance: dict, trusted: bool, higher: bool = True) -> dict[str, Any]:
    return {"value": value, "stderr": stderr, "n": n, "higher_is_better": higher, "trusted": trusted,
            "provenance": provenance}


def evaluate_standalone(cfg: RunConfig, model_spec: str, out: str | Path | None) -> dict[str, Any]:
    """``humpback eval``: one model, the same layout as inside a run (``judge_check/``,
    ``model/eval/summary.json``) in a directory of its own."""
    name = Path(model_spec.rstrip("/")).name.replace(".gguf", "") or "model"
    run = RunDir(out or Path(cfg.run.root) / f"eval-{name}")
    run.lock()
    hardware.configure_threads(cfg.engine.threads)
    model = stages.model_input(model_spec, cfg.model.revision, name="model")
    check = check_judge_stage(run, cfg)
    result = evaluate_model(run, cfg, "model", model, check)
    return json.loads((result.path / "summary.json").read_text())


def check_eval_inputs(cfg: RunConfig) -> None:
    """Fail before any work when evaluation data is missing, rather than after training.

    The local folder (``eval.data_dir``) is demanded only for what is read from it: the AlpacaEval
    reference unless it comes from the hub (fetched here, into the hub cache, when it does), and
    the local held-out tasks. Hub task names are checked against lm-eval's task index (their data
    is downloaded by the first evaluation, ``base/eval``, which runs before any training).

    Raises:
        DataError: naming what is missing and the settings that fix it.
    """
    from evals import bundled, sources
    from evals.heldout import HeldoutError, data_files
    from pipeline.data import DataError

    ev = cfg.eval
    if not ev.enabled:
        return
    hint = ("set eval.data_dir to packaged (the data shipped with the project) or a folder laid out like "
            "evals/data (alpaca_eval/, heldout/); with internet, "
            "eval.alpaca_source=auto or hub reads AlpacaEval from the Hugging Face hub and eval.heldout_tasks=[] "
            "with lm-eval stock tasks in eval.heldout_hub_tasks needs no local held-out files; "
            "or eval.enabled=false to run the pipeline without evaluation")
    data_root = bundled.resolve_data_dir(ev.data_dir)
    data_dir_ok = data_root is not None and data_root.is_dir()
    if ev.alpaca_source == "local" and not data_dir_ok:
        raise DataError(f"evaluation data directory {ev.data_dir!r} does not exist: {hint}")
    try:
        if ev.heldout_tasks:
            if not data_dir_ok:
                raise DataError(f"evaluation data directory {ev.data_dir!r} does not exist, and the local held-out "
                                f"tasks {ev.heldout_tasks} (eval.heldout_tasks) read their files from it: {hint}")
            data_files(ev.heldout_tasks, data_root)
        sources.resolve_reference(ev.data_dir, ev.alpaca_reference, ev.alpaca_source, ev.alpaca_hub_revision)
    except sources.SourceError as exc:
        raise DataError(f"{exc}: {hint}") from exc
    except (HeldoutError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{exc}: {hint}") from exc
    _check_gated_tasks_run(cfg)
    if ev.heldout_hub_tasks:
        from evals.hub_tasks import validate_task_names

        validate_task_names(ev.heldout_hub_tasks)  # HubTaskError is a DataError


def _check_gated_tasks_run(cfg: RunConfig) -> None:
    """A gate on a local held-out task that is not evaluated would fail only after training
    (``metric missing``); say so now. (Hub metric names are known only once lm-eval has built
    the tasks, so only the local tasks' names are checked.)"""
    from evals.heldout import HELDOUT_TASKS
    from pipeline.data import DataError

    if not cfg.gate.enabled:
        return
    evaluated = {*cfg.eval.heldout_tasks, *cfg.eval.heldout_hub_tasks}
    missing = [r.metric for r in cfg.gate.metrics
               if r.metric.split("/")[0] in HELDOUT_TASKS and r.metric.split("/")[0] not in evaluated]
    if missing:
        raise DataError(f"gate.metrics names {missing}, which no configured held-out task produces "
                        f"(eval.heldout_tasks={list(cfg.eval.heldout_tasks)}, "
                        f"eval.heldout_hub_tasks={list(cfg.eval.heldout_hub_tasks)}): gate on metrics the run makes, "
                        f"e.g. gate.metrics=[{{metric: alpaca_eval/win_rate, abs_tol: 5.0}}], or gate.enabled=false")
