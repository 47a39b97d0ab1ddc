"""Head-to-head AlpacaEval: M_t judged directly against the models it is compared with.

A win rate against a fixed reference answers "how good is this model"; whether an iteration
helped is better asked directly: the judge sees M_t's and M_{t-1}'s answers to the same prompt
side by side. Stage ``iter_NN/head_to_head`` does that against M_{t-1} and M0 (and the
best earlier iteration when ``gate.baseline`` is ``best``), reusing the answers each model's
evaluation already generated (nothing is generated twice), through the configured judge and
alpaca_eval's annotator, both answer orders unless the judge is symmetric. Its judgments share
the run's judge cache. Output, per opponent ``b``: ``vs_iter_BB/annotations.json`` (per prompt,
the preference for M_t) and ``alpaca_eval.json``, and ``head_to_head.json`` with every win rate,
its paired interval and MDE (:mod:`evals.paired`). The gate reads the per-prompt preferences.
"""

from __future__ import annotations

from typing import Any

from harness.config import RunConfig
from harness.rundir import RunDir, StageContext, StageResult
from pipeline import faults
from pipeline.io import read_jsonl, write_json_atomic

STAGE = "head_to_head"
SUMMARY = "head_to_head.json"


def opponents(cfg: RunConfig, t: int, evals: dict[int, StageResult]) -> list[int]:
    """The earlier iterations M_t is judged against: the one before and M0, and the best earlier
    win rate when the gate compares with the best."""
    chosen = {t - 1, 0}
    if cfg.gate.baseline == "best":
        rates = {i: (r.stats.get("metrics") or {}).get("alpaca_eval/win_rate") for i, r in evals.items() if i < t}
        rates = {i: v for i, v in rates.items() if isinstance(v, (int, float))}
        if rates:
            chosen.add(max(rates, key=lambda i: (rates[i], -i)))
    return sorted(i for i in chosen if 0 <= i < t and i in evals)


def head_to_head_stage(run: RunDir, cfg: RunConfig, t: int, evals: dict[int, StageResult],
                       judge_check: StageResult) -> StageResult:
    """Stage ``iter_NN/head_to_head``; ``evals`` holds the committed ``iter_NN/eval`` stages up to t."""
    from evals import alpaca
    from evals.item_scores import preferences
    from evals.paired import one_sample
    from harness.evaluate import eval_settings, make_judge

    ev = cfg.eval
    against = opponents(cfg, t, evals)
    inputs = {"judge_check": judge_check, f"iter_{t:02d}": evals[t], **{f"iter_{b:02d}": evals[b] for b in against}}
    settings = {"eval": eval_settings(cfg), "opponents": against, "power": cfg.gate.power}

    def fn(ctx: StageContext) -> dict[str, Any]:
        judge = make_judge(cfg)
        mine = read_jsonl(ctx.inputs[f"iter_{t:02d}"].path / "alpaca" / "model_outputs.jsonl")
        results: dict[str, Any] = {}
        for b in against:
            theirs = read_jsonl(ctx.inputs[f"iter_{b:02d}"].path / "alpaca" / "model_outputs.jsonl")
            out = ctx.work / f"vs_iter_{b:02d}"
            scored = alpaca.score_alpaca_eval(mine, theirs, out, judge=judge, cache_dir=run.root / "cache",
                                              lc_glm="length_controlled_minimal",
                                              both_orders=ev.judge_orders == "both")
            prefs = preferences(out / "annotations.json")
            paired = one_sample(prefs.values, 50.0, power=cfg.gate.power, bounds=prefs.bounds) if prefs.values else None
            results[f"iter_{b:02d}"] = {
                "win_rate": scored["win_rate"], "n": scored["n"], "n_missing": scored["n_missing"],
                "n_wins": scored["n_wins"], "n_wins_base": scored["n_wins_base"], "n_draws": scored["n_draws"],
                "orders": scored["orders"],
                "interval_95": None if paired is None else [50.0 + paired.low, 50.0 + paired.high],
                "mde_95": None if paired is None else paired.mde,
                "method": None if paired is None else paired.method,
            }
            faults.checkpoint("h2h.opponent", out)
        trusted = bool(ctx.inputs["judge_check"].stats.get("trusted"))
        summary = {"model": f"iter_{t:02d}", "against": results, "judge": judge.identity(), "trusted": trusted}
        write_json_atomic(ctx.work / SUMMARY, summary)
        return {"win_rate_vs": {k: v["win_rate"] for k, v in results.items()}, "trusted": trusted}

    return run.stage(f"iter_{t:02d}/{STAGE}", fn, version="head_to_head_v3", settings=settings, inputs=inputs)
