"""Stages that need no model: seed loading with the contamination check."""

import gzip
import json

from harness.config import load_config
from harness.rundir import RunDir
from harness.stages import prepare_seed
from pipeline.io import read_jsonl


def test_seed_pairs_overlapping_an_eval_prompt_are_rejected(tmp_path, eval_data):
    alpaca = json.loads(gzip.decompress((eval_data / "alpaca_eval" / "reference_text_davinci_003.json.gz").read_bytes()))
    leaked = alpaca[3]["instruction"]
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Describe how bread dough rises and what yeast does during proofing.", "response": "Yeast ferments sugars."},
        {"instruction": leaked, "response": "A copied evaluation prompt."},
    ]) + "\n")
    cfg = load_config(None, [f"seed.path={seed}", f"eval.data_dir={eval_data}"])
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


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_engine_loads_a_plain_model_in_its_dtype_and_merges_an_adapter_in_fp32(tiny_model, tmp_path, monkeypatch):
    """With bf16 on, a plain model is read straight into bf16 (never held in fp32), an adapter is
    merged into its fp32 base first; either way the weights equal fp32 weights rounded once."""
    import torch

    from harness import stages
    from pipeline.settings import TrainSection
    from pipeline.finetune import finetune
    from pipeline.models import load_model

    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"},
              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}] for i in range(8)]
    adapter = tmp_path / "adapter"
    finetune(str(tiny_model), chats, TrainSection(max_steps=2, batch_size=4, learning_rate=5e-2, bf16="off",
                                                  lora_target_modules=["q_proj", "v_proj"]),
             adapter, tmp_path / "scratch", seed=0)
    loaded = []
    real = stages.load_model
    monkeypatch.setattr(stages, "load_model", lambda path, **kw: loaded.append(kw.get("dtype")) or real(path, **kw))
    cfg = load_config(None, ["engine.bf16=on", "engine.device=cpu"])
    for path in (tiny_model, adapter):
        engine = stages.make_engine(str(path), cfg, batch_size=2)
        want = {k: v.to(torch.bfloat16) for k, v in _weights(load_model(str(path), dtype=torch.float32)).items()}
        got = _weights(engine.model)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded == [torch.bfloat16, torch.float32]
    # The adapter changed the weights: the merge is not a no-op that would pass the check trivially.
    base, merged = _weights(load_model(str(tiny_model))), _weights(load_model(str(adapter)))
    assert any(not torch.equal(base[k], merged[k]) for k in base)


def test_engine_device_resolves_auto():
    import torch

    from harness import stages

    assert stages.engine_device(load_config(None, ["engine.device=auto"])) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert stages.engine_device(load_config(None, ["engine.device=cuda:1"])) == "cuda:1"


def test_eval_dtype_is_in_the_eval_and_judge_check_settings(eval_data):
    from harness import evaluate

    base = [f"eval.data_dir={eval_data}"]
    for settings in (evaluate.eval_settings, evaluate.judge_check_settings):
        default = settings(load_config(None, base))
        bf16 = settings(load_config(None, [*base, "eval.dtype=bfloat16"]))
        assert default["dtype"] == "float32"
        assert bf16 == {**default, "dtype": "bfloat16"}
