"""Augmentation yield: how many corpus segments get a usable instruction, and why the others don't.

Runs the loop's own stages up to augmentation (seed, corpus, backward model, augment: the
functions of :mod:`harness.stages`, cached in a run directory like ``humpback iterate``, without
the evaluation stages that ``humpback stage augment`` would also run) and prints the augment
stage's counts: segments, kept, rejects per reason, the new-token budget and, where the budget
was derived from the seed, the seed instructions' token lengths.

Run as::

    python -m benchmarks.augment_yield --config configs/demo.yaml run.name=yield-demo corpus.max_segments=48
    python -m benchmarks.augment_yield --config configs/demo.yaml run.name=yield-news \\
        unlabelled.path=resource:news_c4.jsonl corpus.max_segments=48 'run.share_stages_from=[runs/yield-demo]'

Overrides are ``key=value`` as for ``humpback``; the backward model is shared between runs through
``run.share_stages_from`` (same seed and base model, same cache key). ``--json FILE`` also writes
the counts and the rejected instructions' reasons and texts.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from harness import stages
from harness.config import load_config
from harness.iterate import open_run
from pipeline.io import read_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir")
    p.add_argument("--json", help="also write the counts and the rejects here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    run = open_run(cfg, args.run_dir)
    seed = stages.prepare_seed(run, cfg)
    segments = stages.prepare_corpus(run, cfg)
    backward = stages.train_backward(run, cfg, seed, stages.base_model(cfg))
    augmented = stages.augment_corpus(run, cfg, seed, segments, backward)
    stats = augmented.stats
    rejects = read_jsonl(augmented.path / "rejects.jsonl")
    kept = stats["generated"]
    lost = sum(stats["rejected"].values())
    print(f"run directory: {run.root}")
    print(f"corpus: {cfg.unlabelled.path}, segments {stats['segments']}, kept {kept}, rejected {lost} "
          f"({lost / stats['segments']:.0%})")
    for reason, n in sorted(stats["rejected"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<14} {n}")
    for key in ("max_new_tokens", "budget", "salvaged", "new_tokens"):
        if key in stats:
            print(f"{key}: {json.dumps(stats[key])}")
    if args.json:
        out = {"config": args.config, "overrides": args.overrides, "stats": stats,
               "reject_reasons": dict(Counter(r["rejected"] for r in rejects)), "rejects": rejects}
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
