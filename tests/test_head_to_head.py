"""Head-to-head judging and the paired gate, at the demo's evaluation sizes, on planted models.

M0's answers are the reference's own (real AlpacaEval answers); M1 either truncates every
answer to a tenth (a known regression) or repeats M0's answers (no change). The judge is the
fake always-longer judge, vouched for as the end-to-end tests do: these tests are about what the
gate makes of a judge's preferences, not about the judge.
"""

import json
import math

import pytest
import yaml

from evals import alpaca
from harness.config import dump_config, load_config
from harness.gate import decide_iteration
from harness.head_to_head import head_to_head_stage, opponents
from harness.rundir import RunDir
from harness.runview import read_run
from pipeline.io import write_jsonl

WIN = "alpaca_eval/win_rate"
DEMO_ALPACA_N = 6  # configs/demo.yaml: eval.alpaca_subset
DEMO_HELDOUT_N = 4  # configs/demo.yaml: eval.heldout_limit


def _config(tmp_path, metrics):
    tree = {"run": {"name": "h2h"}, "iterate": {"iterations": 1},
            "eval": {"data_dir": "packaged", "alpaca_subset": DEMO_ALPACA_N, "judge": "humpback_longest_fake",
                     "judge_trust": "assumed", "heldout_tasks": ["ifeval"], "heldout_limit": DEMO_HELDOUT_N},
            "gate": {"metrics": metrics, "min_selected": 0}}
    path = tmp_path / "h2h.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path)


def _planted_run(tmp_path, cfg, answer, heldout_now):
    """judge_check, iter_00/eval and iter_01/eval committed as the loop leaves them."""
    run = RunDir(tmp_path / "run")
    (run.root / "config.yaml").write_text(dump_config(cfg))
    instructions = alpaca.load_instruction_set("packaged", "text_davinci_003", DEMO_ALPACA_N, 0)
    check = run.stage("judge_check", lambda ctx: {"trusted": True}, version="test", settings={})
    prov = {"eval_config": "same", "judge": "fake"}
    evals = {}
    for t in (0, 1):
        def fn(ctx, t=t):
            outputs = [{"instruction": r["instruction"], "output": r["output"] if t == 0 else answer(r["output"]),
                        "generator": f"iter_{t:02d}", "dataset": "helpful_base"} for r in instructions.reference]
            (ctx.work / "alpaca").mkdir()
            write_jsonl(ctx.work / "alpaca" / "model_outputs.jsonl", outputs)
            (ctx.work / "heldout").mkdir()
            scores = [1.0] * DEMO_HELDOUT_N if t == 0 else heldout_now
            write_jsonl(ctx.work / "heldout" / "samples_ifeval.jsonl",
                        [{"doc_id": i, "filter": "none", "metrics": ["prompt_level_loose_acc"],
                          "prompt_level_loose_acc": bool(s), "doc_hash": f"d{i}"} for i, s in enumerate(scores)])
            metrics = {WIN: {"value": 50.0, "stderr": 10.0, "n": DEMO_ALPACA_N, "trusted": True, "provenance": prov},
                       "ifeval/prompt_level_loose_acc": {"value": sum(scores) / len(scores), "stderr": 0.2,
                                                         "n": DEMO_HELDOUT_N, "trusted": True, "provenance": prov}}
            (ctx.work / "summary.json").write_text(json.dumps({"model": f"iter_{t:02d}", "metrics": metrics}))
            return {"metrics": {k: v["value"] for k, v in metrics.items()}}
        evals[t] = run.stage(f"iter_{t:02d}/eval", fn, version="test", settings={})
    return run, evals, check


def _gate(tmp_path, answer, heldout_now, metrics):
    cfg = _config(tmp_path, metrics)
    run, evals, check = _planted_run(tmp_path, cfg, answer, heldout_now)
    h2h = head_to_head_stage(run, cfg, 1, evals, check)
    decisions = decide_iteration(read_run(run.root), cfg, 1, evaluated=True).decisions
    return h2h, {d.check: d for d in decisions}


ALL_GATES = [{"metric": WIN, "abs_tol": 5.0}, {"metric": "ifeval/prompt_level_loose_acc", "abs_tol": 0.1},
             {"metric": "truthfulqa_mc2/acc", "abs_tol": 0.05}]


def test_truncated_answers_are_a_regression_at_the_demo_n(tmp_path):
    h2h, gate = _gate(tmp_path, lambda text: text[: max(1, len(text) // 10)], [0.0] * DEMO_HELDOUT_N, ALL_GATES)
    summary = json.loads((h2h.path / "head_to_head.json").read_text())
    assert summary["against"]["iter_00"]["win_rate"] == 0.0 and summary["against"]["iter_00"]["n"] == DEMO_ALPACA_N
    win = gate[WIN]
    assert win.outcome == "regression" and not win.passed, win.reason
    assert win.signal == "head-to-head vs iter_00" and win.current == 0.0 and win.baseline == 50.0
    assert win.level == pytest.approx(1 - 0.05 / 3)  # three gated metrics, Bonferroni
    assert win.high < -5.0 and win.mde is not None
    # IFEval at 4 documents: every one lost is still not enough to see a 0.1 drop: blind, and said so
    ifeval = gate["ifeval/prompt_level_loose_acc"]
    assert ifeval.signal == "paired items" and ifeval.n == DEMO_HELDOUT_N and ifeval.estimate == -1.0
    assert ifeval.blind is True and ifeval.items_needed > DEMO_HELDOUT_N and "BLIND" in ifeval.reason
    assert gate["truthfulqa_mc2/acc"].outcome == "missing"


def test_unchanged_answers_are_never_a_regression(tmp_path):
    _, gate = _gate(tmp_path, lambda text: text, [1.0] * DEMO_HELDOUT_N, ALL_GATES[:2])
    for name in (WIN, "ifeval/prompt_level_loose_acc"):
        assert gate[name].outcome in ("pass", "inconclusive") and gate[name].passed, gate[name].reason
    assert gate[WIN].estimate == 0.0


def test_the_reference_signal_pairs_prompts_instead(tmp_path):
    cfg_metrics = [{"metric": WIN, "abs_tol": 5.0}]
    cfg = _config(tmp_path, cfg_metrics)
    cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"win_rate_signal": "reference"})})
    run, evals, check = _planted_run(tmp_path, cfg, lambda t: t[:5], [1.0] * DEMO_HELDOUT_N)
    # no annotations against the reference were written, so there are no per-prompt scores:
    # the gate says it compared the summary numbers as if independent
    d = {x.check: x for x in decide_iteration(read_run(run.root), cfg, 1, evaluated=True).decisions}[WIN]
    assert d.signal.startswith("unpaired")


def test_opponents_are_the_previous_model_and_m0():
    cfg = load_config(None)
    evals = {i: None for i in range(4)}
    assert opponents(cfg, 3, evals) == [0, 2] and opponents(cfg, 1, evals) == [0]


def test_eval_size_plans_the_items_a_target_effect_needs(tmp_path):
    from harness.eval_size import format_plan, plan

    cfg = _config(tmp_path, ALL_GATES[:2])
    run, evals, check = _planted_run(tmp_path, cfg, lambda text: text[: len(text) // 2 + 1], [1, 0, 1, 0])
    head_to_head_stage(run, cfg, 1, evals, check)
    result = plan(run.root, {WIN: 5.0, "ifeval/prompt_level_loose_acc": 0.1})
    rows = {r.metric: r for r in result["rows"]}
    assert result["level"] == pytest.approx(0.975) and result["iteration"] == 1 and result["baseline"] == 0
    win = rows[WIN]
    assert win.n_now == DEMO_ALPACA_N and win.signal.startswith("head-to-head vs iter_00") and win.n_full == 805
    assert win.n_needed > DEMO_ALPACA_N and win.mde_now > 5.0
    # worst case: every prompt a clean win or loss (sd 50), normal quantiles at 97.5% and 80%
    assert win.n_worst == math.ceil(((2.2414 + 0.8416) * 50 / 5.0) ** 2)
    ifeval = rows["ifeval/prompt_level_loose_acc"]
    assert ifeval.n_now == DEMO_HELDOUT_N and ifeval.n_needed > DEMO_HELDOUT_N and ifeval.n_full == 541
    text = format_plan(result, minutes=10)
    assert "eval.alpaca_subset=" in text and "target MDE" in text
