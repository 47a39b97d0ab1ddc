"""Stages that need no model: seed loading with the contamination check."""

import json

from harness.config import load_config
from harness.rundir import RunDir
from harness.stages import prepare_seed
from pipeline.io import read_jsonl


def test_seed_pairs_overlapping_an_eval_prompt_are_rejected(tmp_path, shared_data):
    alpaca = json.loads((shared_data / "alpaca_eval" / "reference_text_davinci_003.json").read_text())
    leaked = alpaca[3]["instruction"]
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Describe how bread dough rises and what yeast does during proofing.", "response": "Yeast ferments sugars."},
        {"instruction": leaked, "response": "A copied evaluation prompt."},
    ]) + "\n")
    cfg = load_config(None, [f"seed.path={seed}", f"eval.data_dir={shared_data}"])
    result = prepare_seed(RunDir(tmp_path / "run"), cfg)
    assert result.stats["kept"] == 1 and result.stats["contaminated"] == 1
    assert set(result.stats["checked_against"]) == {"alpaca_eval", "ifeval", "truthfulqa", "gsm8k"}
    rejects = read_jsonl(result.path / "rejects.jsonl")
    assert rejects[0]["reason"].startswith("contamination: overlaps alpaca_eval")
    assert [r["instruction"] for r in read_jsonl(result.path / "data.jsonl")][0].startswith("Describe how bread")


def test_missing_eval_data_is_reported_not_hidden(tmp_path):
    cfg = load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}"])
    result = prepare_seed(RunDir(tmp_path / "run"), cfg)
    assert result.stats["checked_against"] == [] and len(result.stats["not_checked"]) == 4


def test_missing_eval_data_fails_before_any_work(tmp_path, capsys):
    from harness.cli import EXIT_DATA, main

    code = main(["iterate", "--run-dir", str(tmp_path / "run"), f"eval.data_dir={tmp_path / 'nowhere'}"])
    assert code == EXIT_DATA
    err = capsys.readouterr().err
    assert "nowhere" in err and "eval.enabled=false" in err
    assert not (tmp_path / "run" / "seed").exists()
