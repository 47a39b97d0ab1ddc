"""Command-line entry point: ``humpback iterate``, ``humpback stage``, ``humpback config``.

Run as: humpback --help
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from harness.config import ConfigError, dump_config, load_config, valid_keys

EXIT_CONFIG = 2
EXIT_DATA = 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see configs/); defaults apply when omitted")
    p.add_argument("--run-dir", help="run directory (default: <run.root>/<run.name>)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. select.k=4.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="humpback",
        description="Instruction backtranslation (Humpback) with an evaluation-first harness.",
        epilog="Config keys: " + ", ".join(valid_keys()),
    )
    parser.add_argument("--log-level", default=os.environ.get("HUMPBACK_LOG", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("iterate", help="run or resume the whole loop (cached stages are skipped)")
    _common(p)

    from harness.iterate import STAGES

    p = sub.add_parser("stage", help="run one stage and whatever it needs that is not cached yet")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--iteration", "-t", type=int, help="iteration for finetune (default 0), curate/select (default 1)")
    _common(p)

    p = sub.add_parser("config", help="print the resolved config (after overrides) and exit")
    _common(p)
    return parser


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
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0

    from harness.iterate import format_summary, iterate, open_run, stage_name
    from pipeline.data import DataError
    from pipeline.models import ModelError

    run = open_run(cfg, args.run_dir)
    stop = stage_name(args.name, args.iteration) if args.command == "stage" else None
    try:
        summary = iterate(cfg, run, stop_after=stop)
    except (DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
