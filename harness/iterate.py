"""The instruction-backtranslation loop, as a list of cached stage calls.

Run as: humpback iterate --config configs/demo.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness import stages
from harness.config import RunConfig, dump_config
from harness.rundir import RunDir, StageResult, write_json_atomic

log = logging.getLogger(__name__)

STAGES = ("seed", "corpus", "backward", "augment", "finetune", "curate", "select")


class StopAfter(Exception):
    """Raised internally when ``humpback stage`` has reached the stage it was asked for."""


def stage_name(stage: str, iteration: int | None) -> str:
    if stage in ("finetune", "curate", "select"):
        default = 0 if stage == "finetune" else 1
        return f"iter_{(default if iteration is None else iteration):02d}/{stage}"
    return stage


def open_run(cfg: RunConfig, run_dir: str | Path | None) -> RunDir:
    run = RunDir(run_dir or Path(cfg.run.root) / cfg.run.name)
    (run.root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    run.write_env()
    return run


def iterate(cfg: RunConfig, run: RunDir, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage up to ``stop_after`` (all when None); returns the summary."""

    def done(result: StageResult) -> StageResult:
        if result.name == stop_after:
            raise StopAfter(result.name)
        return result

    try:
        seed = done(stages.prepare_seed(run, cfg))                    # human-written seed pairs
        segments = done(stages.prepare_corpus(run, cfg))              # unlabelled segments
        base = stages.base_model(cfg)
        backward = done(stages.train_backward(run, cfg, seed, base))  # M_yx: response -> instruction
        candidates = done(stages.augment_corpus(run, cfg, segments, backward))  # self-augmentation
        model = done(stages.train_forward(run, cfg, 0, seed, base, None))       # M0: seed only
        for t in range(1, cfg.iterate.iterations + 1):
            scores = done(stages.curate_candidates(run, cfg, t, candidates, model))  # rate with M_{t-1}
            selected = done(stages.select_candidates(run, cfg, t, candidates, scores))  # keep >= k
            model = done(stages.train_forward(run, cfg, t, seed, base, selected))    # M_t
    except StopAfter:
        pass
    summary = summarize(run, cfg)
    write_json_atomic(run.root / "summary.json", summary)
    return summary


def summarize(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """Per-stage counts and timings from the manifests on disk, and per-iteration summaries."""
    out: dict[str, Any] = {"run_dir": str(run.root), "stages": {}, "iterations": {}}
    names = ["seed", "corpus", "backward", "augment"]
    for t in range(0, cfg.iterate.iterations + 1):
        names += [f"iter_{t:02d}/{s}" for s in (("finetune",) if t == 0 else ("curate", "select", "finetune"))]
    for name in names:
        result = run.load(name)
        if result is None:
            continue
        out["stages"][name] = {"seconds": result.manifest["seconds"], "stats": result.stats}
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
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run directory: {summary['run_dir']}", "", f"{'stage':<20} {'seconds':>8}  counts"]
    for name, info in summary["stages"].items():
        stats = info["stats"]
        keys = ("kept", "rejected", "segments", "removed", "generated", "histogram", "unscored", "selected",
                "keep_rate", "train_pairs", "steps", "final_loss", "truncated")
        counts = ", ".join(f"{k}={json.dumps(stats[k])}" for k in keys if k in stats)
        lines.append(f"{name:<20} {info['seconds']:>8.1f}  {counts}")
    return "\n".join(lines)
