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

from harness.cli import EXIT_DATA, main
from harness.config import load_config
from harness.iterate import iterate, open_run
from harness.rundir import DONE, MANIFEST, RunDir
from pipeline.io import read_jsonl

pytestmark = pytest.mark.slow

STAGES = ["seed", "corpus", "backward", "augment", "iter_00/finetune",
          "iter_01/curate", "iter_01/select", "iter_01/finetune",
          "iter_02/curate", "iter_02/select", "iter_02/finetune"]


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
        "curate": {"mode": "logprob", "batch_size": 4, "chunk_size": 4},
        "select": {"k": 3.0},
        "finetune": train,
        "engine": {"bf16": "off"},
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
def finished_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(write_config(tmp, tiny_model))
    run = open_run(cfg, tmp / "run")
    summary = iterate(cfg, run)
    return cfg, run, summary


def test_every_stage_committed_with_manifest(finished_run):
    _, run, summary = finished_run
    for name in STAGES:
        path = run.root / name
        assert (path / DONE).exists(), name
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["stage"] == name and manifest["outputs"] and manifest["seconds"] >= 0
        assert set(manifest["packages"]) >= {"torch", "transformers", "peft"}
        assert not list(run.root.rglob("*.partial"))
    assert (run.root / "config.yaml").exists() and (run.root / "env.json").exists()
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
        assert sel["selected"] == len(expected) == len(read_jsonl(run.root / f"iter_{t:02d}" / "select" / "data.jsonl"))
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
    assert set(again.results) == set(STAGES)
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
    iterate(cfg, RunDir(run.root))  # restore for other tests


def test_stage_command_stops_after_its_stage(tiny_model, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_model)
    assert main(["stage", "corpus", "--config", str(cfg_path), "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "corpus" / DONE).exists() and not (tmp_path / "r" / "backward").exists()
    assert "corpus" in capsys.readouterr().out


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


def test_killed_run_resumes_to_identical_outputs(tiny_model, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model)
    reference = tmp_path / "reference"
    subprocess.run(_cli(cfg_path, reference), check=True, env=_env(), capture_output=True, timeout=600)

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
