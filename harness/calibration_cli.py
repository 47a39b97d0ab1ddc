"""``humpback judge-eval`` and ``humpback curator-eval``: an instrument against outside labels,
printed as one table with the trivial baselines, and written as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.config import RunConfig


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "judge-eval", help="measure an AlpacaEval judge against human and GPT-4 labels, beside trivial judges",
        description="Judge labelled answer pairs (LLMBar Natural and MT-Bench: human labels; AlpacaEval: GPT-4's "
                    "judgments) in both orders and print accuracy, order consistency, position and length bias with "
                    "95% bootstrap intervals, beside always-longer, always-first and chance on the same pairs, and "
                    "the trust verdict the loop would use. Judgments are cached per judge identity under "
                    "~/.cache/humpback/judge_eval (or $HUMPBACK_CACHE), so a second run costs nothing.")
    p.add_argument("--judge", help="annotator config (default: eval.judge), e.g. humpback_local_logprob, "
                                   "humpback_longest_fake, or one alpaca_eval ships")
    p.add_argument("--model", help="judge model for local configs (default: eval.judge_model or model.base): a "
                                   "directory, hub id, .gguf file, pkg:DIST/FILE or chunked:NAME")
    _shared(p)

    p = sub.add_parser(
        "curator-eval", help="measure a curator (rubric rating) against human and GPT-4 labels",
        description="Rate each answer of labelled pairs on the curation rubric (curate.mode, curate.template) and "
                    "print pairwise accuracy with 95% intervals beside always-longer and chance, the rank "
                    "correlation with GPT-4 across five AlpacaEval models, and the threshold k the labels suggest.")
    p.add_argument("--model", help="curator model (default: model.base): directory, hub id, .gguf, pkg:... or chunked:NAME")
    _shared(p)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, help="labelled pairs per source (default: eval.judge_calibration_pairs "
                                             "for judges, curate.calibration_pairs or 20 for curators); 0 = all")
    p.add_argument("--sources", help="comma-separated: llmbar_natural, llmbar_mtbench, alpaca_eval_gpt4 "
                                     "(default: eval.calibration_sources)")
    p.add_argument("--out", help="write the full result as JSON here")
    p.add_argument("--config", "-c", help="YAML config file (engine, eval and curate settings)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _sources(args) -> list[str] | None:
    return [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None


def _write(args, result: dict[str, Any]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


def judge_eval(cfg: RunConfig, args) -> int:
    from evals import alpaca
    from evals.calibration.tables import judge_table
    from harness import stages
    from harness.calibration import CONFIGURED, calibrate_judge
    from pipeline.models import resolve_base

    name = args.judge or cfg.eval.judge
    spec = args.model or cfg.eval.judge_model or cfg.model.base
    probe = alpaca.Judge(name)
    model = resolve_base(spec) if probe.needs_engine() else None
    judge = alpaca.Judge(name, model, batch_size=cfg.eval.batch_size, device=stages.engine_device(cfg),
                         dtype=cfg.eval.dtype)
    n = CONFIGURED if args.pairs is None else (None if args.pairs == 0 else args.pairs)
    result = calibrate_judge(judge, cfg, n=n, sources=_sources(args))
    result["judge_model_spec"] = spec if model else None
    print(judge_table(result))
    timing = result["timing"]
    print(f"\n{result['verdict']}")
    print(f"judged now: {timing['judged_now']} in {timing['seconds']} s"
          + (f" ({timing['seconds_per_judgment']} s each)" if timing["seconds_per_judgment"] else " (all cached)"))
    _write(args, result)
    return 0


def curator_eval(cfg: RunConfig, args) -> int:
    import time

    from evals.calibration.tables import curator_table
    from harness import stages
    from harness.calibration import calibrate_curator

    spec = args.model or cfg.model.base
    n = args.pairs if args.pairs is not None else (cfg.curate.calibration_pairs or 20)
    if args.sources:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"calibration_sources": _sources(args)})})
    engine = stages.make_engine(stages.resolve_base(spec), cfg, cfg.curate.batch_size)
    start = time.perf_counter()
    result, _ = calibrate_curator(engine, cfg, stages.system_prompt(cfg), None if n == 0 else n, seed=cfg.run.seed,
                                  subject=f"curator ({cfg.curate.mode})")
    seconds = time.perf_counter() - start
    result.update(model_spec=spec, seconds=round(seconds, 2),
                  seconds_per_rating=round(seconds / max(1, result["answers_rated"]), 4))
    print(curator_table(result))
    k = result["suggested_k"]
    print(f"\nthreshold suggested by the human labels: k = {k['k']} (TPR {k['tpr']}, FPR {k['fpr']}); "
          f"{result['answers_rated']} answers rated in {seconds:.1f} s ({result['seconds_per_rating']} s each), "
          f"{result['unscored']} unscored")
    _write(args, result)
    return 0


def run(cfg: RunConfig, args) -> int:
    from evals.calibration.pairs import CalibrationDataError
    from pipeline.models import ModelError

    try:
        return judge_eval(cfg, args) if args.command == "judge-eval" else curator_eval(cfg, args)
    except (CalibrationDataError, ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
