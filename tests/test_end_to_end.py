"""Two iterations of the whole loop on the tiny model: layout, counts, caching, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import EXIT_CONFIG, EXIT_DATA, EXIT_GATE, main
from harness.config import load_config
from harness.iterate import iterate, open_run, planned_stages
from harness.rundir import DONE, MANIFEST, RunDir
from pipeline.io import read_jsonl

pytestmark = pytest.mark.slow

STAGES = ["seed", "corpus", "backward", "augment", "iter_00/finetune",
          "iter_01/curate", "iter_01/select", "iter_01/finetune",
          "iter_02/curate", "iter_02/select", "iter_02/finetune"]
EVALS = ["judge_check", "base/eval", "iter_00/eval", "iter_01/eval", "iter_02/eval", "iter_01/head_to_head",
         "iter_02/head_to_head"]


def tiny_overrides(model: Path) -> dict:
    train = {"max_steps": 3, "batch_size": 4, "max_seq_len": 256, "bf16": "off", "learning_rate": 1e-3,
             "lora_target_modules": ["q_proj", "v_proj"]}
    return {
        "run": {"name": "tiny", "seed": 0},
        "model": {"base": str(model)},
        "seed": {"path": "resource:demo_seed.jsonl", "limit": 12},
        "unlabelled": {"path": "pydoc:topics", "limit": 12},
        "corpus": {"max_chars": 1500, "max_segments": 12},
        "backward": train,
        "augment": {"max_new_tokens": 24, "batch_size": 4, "chunk_size": 1, "drop_unfinished": False},
        "curate": {"mode": "logprob", "batch_size": 4, "chunk_size": 4, "calibration_pairs": 2},
        "select": {"k": 3.0},
        "finetune": train,
        "engine": {"bf16": "off"},
        # The fake judge is always-longer itself, so its calibration cannot trust it; the tests
        # vouch for it to exercise gates on win rates.
        "eval": {"data_dir": "packaged", "alpaca_subset": 3, "judge": "humpback_longest_fake", "judge_check_pairs": 2,
                 "judge_trust": "assumed", "judge_calibration_pairs": 10,
                 "min_judge_accuracy": 0.5, "heldout_tasks": ["truthfulqa_mc1"], "heldout_limit": 2,
                 "max_new_tokens": 12, "batch_size": 4},
        # The tiny curator may well select the same pairs twice; these tests want both iterations.
        "gate": {"metrics": [{"metric": "truthfulqa_mc1/acc", "abs_tol": 0.05},
                             {"metric": "alpaca_eval/win_rate", "abs_tol": 5.0}], "stop_at_fixed_point": False},
        "iterate": {"iterations": 2},
    }


def write_config(tmp_path: Path, model: Path, **section_overrides) -> Path:
    tree = tiny_overrides(model)
    for key, value in section_overrides.items():
        tree[key] = {**tree.get(key, {}), **value}
    path = tmp_path / "tiny.yaml"
    path.write_text("# Run as: humpback iterate --config tiny.yaml\n" + yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model, eval_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(write_config(tmp, tiny_model))
    run = open_run(cfg, tmp / "run")
    summary = iterate(cfg, run)
    return cfg, run, summary


def test_every_stage_committed_with_manifest(finished_run):
    _, run, summary = finished_run
    for name in STAGES + EVALS:
        path = run.root / name
        assert (path / DONE).exists(), name
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["stage"] == name and manifest["outputs"] and manifest["seconds"] >= 0
        assert set(manifest["packages"]) >= {"torch", "transformers", "peft"}
        assert not list(run.root.rglob("*.partial"))
    assert (run.root / "config.yaml").exists() and (run.root / "env.json").exists()
    env = json.loads((run.root / "env.json").read_text())
    assert 1 <= env["torch_threads"] <= env["cpu_budget"]
    assert isinstance(env["bf16_auto"]["use"], bool) and env["bf16_auto"]["reason"]
    assert set(summary["iterations"]) == {0, 1, 2}
    assert (run.root / "iter_02" / "summary.json").exists()


def test_counts_add_up(finished_run):
    cfg, run, _ = finished_run
    stats = {name: json.loads((run.root / name / MANIFEST).read_text())["stats"] for name in STAGES}
    assert stats["seed"]["kept"] == 12 == len(read_jsonl(run.root / "seed" / "data.jsonl"))
    corpus = stats["corpus"]
    assert corpus["kept"] == 12 == len(read_jsonl(run.root / "corpus" / "data.jsonl"))
    assert corpus["kept"] + sum(corpus["removed"].values()) == corpus["segments"]
    aug = stats["augment"]
    candidates = read_jsonl(run.root / "augment" / "candidates.jsonl")
    assert aug["generated"] == len(candidates) > 0
    assert aug["generated"] + sum(aug["rejected"].values()) == aug["segments"] == 12
    for t in (1, 2):
        cur, sel, ft = (stats[f"iter_{t:02d}/{s}"] for s in ("curate", "select", "finetune"))
        scores = read_jsonl(run.root / f"iter_{t:02d}" / "curate" / "scores.jsonl")
        assert sum(cur["histogram"].values()) == cur["pairs"] == len(candidates) == len(scores)
        expected = [s for s in scores if s["score"] is not None and s["score"] >= cfg.select.k]
        assert sel["selected"] + sel["contaminated"] == len(expected)
        assert sel["selected"] == len(read_jsonl(run.root / f"iter_{t:02d}" / "select" / "data.jsonl"))
        assert sel["selected"] + sel["contaminated"] + sel["below_k"] + sel["unscored"] == sel["candidates"]
        assert sel["curator"]["n"] == 40 and set(sel["quality"]) >= {"instruction_chars", "instruction_distinct_2"}
        assert ft["train_pairs"] == 12 + sel["selected"]
    assert stats["iter_00/finetune"]["train_pairs"] == 12
    # M_t is a LoRA adapter on the base model, not on M_{t-1} (the paper fine-tunes the base each time).
    adapter = json.loads((run.root / "iter_02" / "finetune" / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == cfg.model.base


def test_curation_rates_with_the_previous_model(finished_run):
    _, run, _ = finished_run
    for t in (1, 2):
        manifest = json.loads((run.root / f"iter_{t:02d}" / "curate" / MANIFEST).read_text())
        assert manifest["inputs"]["model"]["stage"] == f"iter_{t - 1:02d}/finetune"


def test_rerun_skips_everything(finished_run):
    cfg, run, _ = finished_run
    again = RunDir(run.root)
    iterate(cfg, again)
    assert set(again.results) == set(STAGES + EVALS)
    assert all(r.skipped for r in again.results.values())


def test_changed_selection_reruns_only_what_follows(finished_run, tiny_model, tmp_path):
    cfg, run, _ = finished_run
    changed = load_config(write_config(tmp_path, tiny_model, select={"k": 2.0}))
    assert changed.model_dump() != cfg.model_dump()
    again = RunDir(run.root)
    iterate(changed, again)
    rerun = {name for name, r in again.results.items() if not r.skipped}
    assert {"seed", "corpus", "backward", "augment", "iter_00/finetune", "iter_01/curate"}.isdisjoint(rerun)
    assert {"iter_01/select", "iter_01/finetune"} <= rerun
    iterate(cfg, open_run(cfg, run.root))  # restore for other tests


def test_stage_command_stops_after_its_stage(tiny_model, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_model)
    assert main(["stage", "corpus", "--config", str(cfg_path), "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "corpus" / DONE).exists() and not (tmp_path / "r" / "backward").exists()
    assert "corpus" in capsys.readouterr().out


def test_stage_command_runs_an_evaluation_stage(tiny_model, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model)
    assert main(["stage", "base_eval", "--config", str(cfg_path), "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "judge_check" / DONE).exists() and (tmp_path / "r" / "base" / "eval" / DONE).exists()
    assert not (tmp_path / "r" / "backward").exists()


def test_stage_command_refuses_a_stage_the_config_never_runs(tiny_model, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_model)
    args = ["--config", str(cfg_path), "--run-dir", str(tmp_path / "r")]
    assert main(["stage", "eval", "-t", "3", *args]) == EXIT_CONFIG
    assert "iter_03/eval" in capsys.readouterr().err
    assert main(["stage", "base_eval", *args, "eval.enabled=false"]) == EXIT_CONFIG
    assert "eval.enabled is false" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_planned_stages_are_the_stages_a_run_commits(finished_run):
    cfg, run, _ = finished_run
    assert planned_stages(cfg) == [name for name in planned_stages(cfg) if (run.root / name / DONE).exists()]
    assert set(planned_stages(cfg)) == set(STAGES + EVALS)


def test_unusable_seed_file_exits_with_named_file(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": ""}\nnot json\n')
    code = main(["stage", "seed", "--config", str(write_config(tmp_path, tiny_model)), "--run-dir",
                 str(tmp_path / "r"), f"seed.path={bad}"])
    assert code == EXIT_DATA
    assert "bad.jsonl" in capsys.readouterr().err


def _cli(cfg_path: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "iterate", "--config", str(cfg_path), "--run-dir", str(run_dir)]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_killed_run_resumes_to_identical_outputs(finished_run, tiny_model, tmp_path):
    # The reference is the uninterrupted in-process run of the same config.
    cfg_path = write_config(tmp_path, tiny_model)
    reference = finished_run[1].root

    interrupted = tmp_path / "interrupted"
    marker = interrupted / "augment.partial" / "_scratch" / "progress" / "chunks" / "00002.jsonl"
    proc = subprocess.Popen(_cli(cfg_path, interrupted), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run ended before it could be killed mid-augmentation"
    assert not (interrupted / "augment" / DONE).exists()

    resumed = subprocess.run(_cli(cfg_path, interrupted), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing" in resumed.stderr and "cached" in resumed.stderr
    for name in STAGES:
        a = json.loads((reference / name / MANIFEST).read_text())
        b = json.loads((interrupted / name / MANIFEST).read_text())
        assert a["output_digest"] == b["output_digest"], name


def test_every_model_is_evaluated_with_provenance(finished_run):
    _, run, _ = finished_run
    summaries = {name: json.loads((run.root / name / "summary.json").read_text())
                 for name in EVALS if name.endswith("/eval")}
    names = None
    for name, summary in summaries.items():
        metrics = summary["metrics"]
        assert {"alpaca_eval/win_rate", "truthfulqa_mc1/acc"} <= set(metrics)
        for m in metrics.values():
            assert {"value", "stderr", "n", "higher_is_better", "trusted", "provenance"} <= set(m)
        assert metrics["alpaca_eval/win_rate"]["n"] == 3 and metrics["truthfulqa_mc1/acc"]["n"] == 2
        names = names or set(metrics)
        assert set(metrics) == names
    # Same evaluation settings, different models: provenance must match so gates can compare.
    provs = {json.dumps(s["metrics"]["truthfulqa_mc1/acc"]["provenance"], sort_keys=True) for s in summaries.values()}
    assert len(provs) == 1
    check = json.loads((run.root / "judge_check" / "judge_check.json").read_text())
    assert check["n_judgments"] > 0 and "position_bias" in check
    # Trust is decided by the calibration on outside labels: the fake judge is always-longer itself.
    calibration = json.loads((run.root / "judge_check" / "calibration.json").read_text())
    assert calibration["groups"]["human"]["vs"]["longer"]["mean"] == 0.0 and calibration["trusted"] is False
    for summary in summaries.values():
        check = summary["judge_check"]
        assert check["trusted"] is True and check["verdict"].startswith("trust assumed by configuration")
        assert "does not beat always-longer" in check["verdict"] and check["human_accuracy"] is not None
    # Every curation rates the calibration pairs too, and its stats carry the headline numbers.
    for t in (1, 2):
        stage = run.root / f"iter_{t:02d}" / "curate"
        assert json.loads((stage / "calibration.json").read_text())["groups"]["human"]["raters"]["curator"]["n_pairs"] >= 1
        stats = json.loads((stage / "manifest.json").read_text())["stats"]["calibration"]
        assert {"human_accuracy", "human_accuracy_low", "gpt4_accuracy", "suggested_k"} <= set(stats)


def test_gates_written_and_passed(finished_run):
    _, run, _ = finished_run
    for t in (1, 2):
        g = json.loads((run.root / f"iter_{t:02d}" / "gate.json").read_text())
        assert g["passed"] and g["evaluated"]
        checks = {d["check"] for d in g["decisions"]}
        assert {"data/selected", "curation/unscored_rate", "data/contamination_rate", "augment/reject_rate",
                "truthfulqa_mc1/acc"} <= checks
        # every evaluation check is paired and says what it could have seen
        for d in (d for d in g["decisions"] if d["check"] in ("truthfulqa_mc1/acc", "alpaca_eval/win_rate")):
            assert d["outcome"] in ("pass", "inconclusive") and d["low"] <= d["estimate"] <= d["high"]
            assert d["level"] == pytest.approx(0.975) and d["blind"] is True and d["items_needed"] > d["n"]
        win = next(d for d in g["decisions"] if d["check"] == "alpaca_eval/win_rate")
        assert win["signal"] == f"head-to-head vs iter_{t - 1:02d}" and win["n"] == 3
        changed = [d for d in g["decisions"] if d["check"] == "data/changed"]
        # iteration 1 has no earlier selection to repeat; iteration 2 says whether it repeated iteration 1's
        assert (changed == []) if t == 1 else (changed[0]["outcome"] in ("changed", "fixed point")
                                                and changed[0]["passed"])
    h2h = json.loads((run.root / "iter_02" / "head_to_head" / "head_to_head.json").read_text())
    assert set(h2h["against"]) == {"iter_00", "iter_01"}
    report = (run.root / "report.md").read_text()
    assert "## Head to head" in report and "blind (n needed)" in report


def test_report_and_tracking_written(finished_run):
    _, run, _ = finished_run
    assert (run.root / "report.md").exists() and (run.root / "report.html").exists()
    assert (run.root.parent / "mlflow.db").exists()
    assert "## Judge calibration (outside labels" in (run.root / "report.md").read_text()
    import mlflow

    uri = f"sqlite:///{run.root.parent / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    children = {r.data.tags.get("mlflow.runName"): r for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id])}
    m1 = children["iter_01"].data.metrics
    assert "curation/calibration_human_accuracy" in m1 and "judge/human_accuracy" in m1 and "judge/minus_longer" in m1


def test_failing_data_gate_stops_with_exit_status(finished_run, tiny_model, tmp_path, capsys):
    _, run, _ = finished_run
    cfg_path = write_config(tmp_path, tiny_model, gate={"min_selected": 1000})
    code = main(["iterate", "--config", str(cfg_path), "--run-dir", str(run.root)])
    assert code == EXIT_GATE
    err = capsys.readouterr().err
    assert "iteration 1 failed its gate" in err and "data/selected" in err and "below the minimum 1000" in err
    gate_file = json.loads((run.root / "iter_01" / "gate.json").read_text())
    assert not gate_file["passed"] and not gate_file["evaluated"]
    assert main(["gate", str(run.root)]) == EXIT_GATE  # re-decided from disk: still failing
    restored = load_config(write_config(tmp_path, tiny_model))
    iterate(restored, open_run(restored, run.root))  # restore the run and its config.yaml


def test_a_repeated_selection_ends_the_loop_as_a_fixed_point(tiny_model, tmp_path, capsys):
    """select.k=all keeps every candidate in both iterations: iteration 2 would train M2 on exactly
    M1's data, so the loop ends after iter_02/select, successfully, and says why; with
    gate.stop_at_fixed_point=false it trains M2 anyway."""
    args = ["iterate", "--config", str(write_config(tmp_path, tiny_model)), "--run-dir", str(tmp_path / "r"),
            "select.k=all", "eval.enabled=false"]
    assert main(args + ["gate.stop_at_fixed_point=true"]) == 0
    out = capsys.readouterr().out
    assert "the loop ended at iter_02, before fine-tuning: fixed point" in out
    root = tmp_path / "r"
    assert (root / "iter_02" / "select" / DONE).exists() and not (root / "iter_02" / "finetune").exists()
    gate_file = json.loads((root / "iter_02" / "gate.json").read_text())
    fixed = next(d for d in gate_file["decisions"] if d["check"] == "data/changed")
    assert gate_file["passed"] and fixed["outcome"] == "fixed point"
    assert "iter_02 selected exactly iter_01's training data" in fixed["reason"]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["stopped"]["iteration"] == 2
    assert "- iter_02: data/changed: fixed point" in (root / "report.md").read_text()

    assert main(args + ["gate.stop_at_fixed_point=false"]) == 0
    assert (root / "iter_02" / "finetune" / DONE).exists()
    assert "stopped" not in json.loads((root / "summary.json").read_text())


def test_a_threshold_below_every_score_is_reported_as_unfiltered(tiny_model, tmp_path, capsys):
    """select.k=1 is at or below every expected score (1-5): curation filters nothing. By default
    the loop goes on and says so; gate.on_unfiltered=stop fails the gate before M1 is trained."""
    args = ["iterate", "--config", str(write_config(tmp_path, tiny_model)), "--run-dir", str(tmp_path / "r"),
            "select.k=1", "eval.enabled=false", "iterate.iterations=1"]
    root = tmp_path / "r"
    assert main(args + ["gate.on_unfiltered=stop"]) == EXIT_GATE
    err = capsys.readouterr().err
    assert "iteration 1 failed its gate" in err and "curation/filtered" in err and "unfiltered: k=1 " in err
    assert (root / "iter_01" / "select" / DONE).exists() and not (root / "iter_01" / "finetune").exists()

    assert main(args) == 0  # the default goes on, and says so in the summary, the report and the gate file
    assert "iter_01's curation filtered nothing: unfiltered: k=1 is at or below" in capsys.readouterr().out
    assert (root / "iter_01" / "finetune" / DONE).exists()
    gate_file = json.loads((root / "iter_01" / "gate.json").read_text())
    d = next(d for d in gate_file["decisions"] if d["check"] == "curation/filtered")
    assert gate_file["passed"] and d["outcome"] == "unfiltered"
    assert json.loads((root / "summary.json").read_text())["unfiltered"][0]["iteration"] == 1
    assert "- iter_01: curation/filtered: unfiltered" in (root / "report.md").read_text()


def test_gate_command_redecides_from_disk(finished_run, tmp_path, capsys):
    """An evaluator found untrusted after the fact: ``humpback gate`` refuses the comparison."""
    import shutil

    _, run, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("model"))
    assert main(["gate", str(copy)]) == 0
    path = copy / "iter_02" / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    summary["metrics"]["alpaca_eval/win_rate"]["trusted"] = False
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["gate", str(copy)]) == EXIT_GATE
    out = capsys.readouterr().out
    assert "iter_02: FAIL" in out and "alpaca_eval/win_rate: refused: this iteration's evaluator is untrusted" in out


def test_gate_command_sees_a_planted_regression_as_blind_at_three_prompts(finished_run, tmp_path, capsys):
    """M2 loses every head-to-head prompt against M1: at the tiny run's 3 prompts that is not
    enough to call a regression, and the gate says so (inconclusive, blind, the n it would need);
    with gate.on_inconclusive=stop the loop would stop there."""
    import shutil

    _, run, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("model"))
    path = copy / "iter_02" / "head_to_head" / "vs_iter_01" / "annotations.json"
    rows = json.loads(path.read_text())
    path.write_text(json.dumps([{**r, "preference": 1.0} for r in rows]))  # the baseline won each one
    capsys.readouterr()
    assert main(["gate", str(copy)]) == 0
    win = next(d for d in json.loads((copy / "iter_02" / "gate.json").read_text())["decisions"]
               if d["check"] == "alpaca_eval/win_rate")
    assert win["outcome"] == "inconclusive" and win["estimate"] == -50.0 and win["blind"] is True
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["gate"]["on_inconclusive"] = "stop"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["gate", str(copy)]) == EXIT_GATE  # every check at n <= 3 is inconclusive: the first gate stops
    out = capsys.readouterr().out
    assert "iter_01: FAIL" in out and "gate.on_inconclusive=stop" in out


def test_standalone_eval_writes_the_same_layout(tiny_model, eval_data, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_model)
    out = tmp_path / "eval-tiny"
    assert main(["eval", "--model", str(tiny_model), "--config", str(cfg_path), "--out", str(out)]) == 0
    summary = json.loads((out / "model" / "eval" / "summary.json").read_text())
    assert summary["model"] == "model" and "alpaca_eval/win_rate" in summary["metrics"]
    assert (out / "judge_check" / "judge_check.json").exists()
    assert (out / "model" / "eval" / "alpaca" / "model_outputs.jsonl").exists()
    assert json.loads(capsys.readouterr().out)["metrics"].keys() == summary["metrics"].keys()
