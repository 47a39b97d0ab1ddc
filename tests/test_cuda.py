"""The GPU branches: engine and judge on CUDA, the KV budget read from the GPU, LoRA training on CUDA.

Skipped where torch sees no CUDA device (this project's CI machine has none); ``make test-gpu``
runs just these on a machine that has one. Everything here uses the tiny test model.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.settings import TrainSection
from harness.config import load_config
from harness.stages import make_engine
from pipeline import hardware
from pipeline.dropout import LaneDropout
from pipeline.engine import SamplingParams, TransformersEngine
from pipeline.finetune import finetune, training_model
from pipeline.models import is_adapter, load_model, load_tokenizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain tides in one sentence."}],
    [{"role": "user", "content": "What is the capital of France, and why is it that city?"}],
]
CHOICES = [" 1", " 2", " 3", " 4", " 5"]
TRAIN_CHATS = [
    [{"role": "user", "content": f"What is {i} plus {i}?"},
     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
    for i in range(12)
]


def _engine(tiny_model, device: str) -> TransformersEngine:
    model = load_model(str(tiny_model), dtype=torch.float32).to(device)
    return TransformersEngine(model, load_tokenizer(str(tiny_model)), batch_size=3, kv_cache_gib=None)


def test_engine_on_cuda_scores_as_on_the_cpu(tiny_model):
    """Same fp32 weights on both devices: the score tokens' probabilities agree, and greedy
    decoding on the GPU starts with the CPU's most likely token."""
    cpu, gpu = _engine(tiny_model, "cpu"), _engine(tiny_model, "cuda")
    assert gpu.model.device.type == "cuda"
    want, got = cpu.choice_probs(CHATS, "Score:", CHOICES), gpu.choice_probs(CHATS, "Score:", CHOICES)
    for w, g in zip(want, got):
        assert g == pytest.approx(w, abs=1e-4)
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    ids = cpu._encode([cpu.render(c) for c in CHATS])
    first_gpu = [t[0] for t in gpu.generate_tokens(ids, params)]
    with torch.no_grad():
        first_cpu = [int(cpu.model(input_ids=torch.tensor([i])).logits[0, -1].argmax()) for i in ids]
    assert first_gpu == first_cpu


def test_engine_generates_in_batches_on_cuda(tiny_model):
    gpu = _engine(tiny_model, "cuda")
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    batched = gpu.generate(CHATS, params)
    single = [gpu.generate([c], params)[0] for c in CHATS]
    assert [c.text for c in batched] == [c.text for c in single]


def test_kv_cache_auto_reads_the_gpus_free_memory(tiny_model):
    free, _total = torch.cuda.mem_get_info()
    budget = hardware.kv_cache_budget_gib("auto", torch.device("cuda"))
    assert budget == pytest.approx(hardware.KV_CACHE_SHARE * free / 2**30, abs=0.25)
    engine = TransformersEngine(load_model(str(tiny_model)).to("cuda"), load_tokenizer(str(tiny_model)),
                                kv_cache_gib="auto")
    assert engine.kv_cache_gib == pytest.approx(budget, abs=0.25)


def test_make_engine_puts_the_model_on_the_gpu_in_bf16_when_supported(tiny_model):
    cfg = load_config(None, ["engine.device=auto", "engine.bf16=auto"])
    engine = make_engine(str(tiny_model), cfg, batch_size=2)
    assert engine.model.device.type == "cuda"
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert next(engine.model.parameters()).dtype == want
    assert hardware.bf16_choice().use == torch.cuda.is_bf16_supported()


def test_local_judge_runs_on_the_gpu_in_fp32(tiny_model):
    from evals import alpaca

    engine = alpaca.Judge(alpaca.LOCAL_JUDGE, str(tiny_model), device="cuda").get_engine()
    assert engine.model.device.type == "cuda"
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}


def test_lora_model_for_cuda_keeps_torch_dropout_and_a_bf16_base(tiny_model):
    cfg = TrainSection(method="lora", lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"])
    model = training_model(str(tiny_model), cfg, bf16=True)
    assert not any(isinstance(m, LaneDropout) for m in model.modules())
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and adapters == {torch.float32}


@pytest.mark.parametrize("bf16", ["on", "off"])
def test_lora_finetune_on_cuda(tiny_model, tmp_path, bf16):
    if bf16 == "on" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = TrainSection(method="lora", max_steps=4, batch_size=4, learning_rate=5e-3, logging_steps=1,
                       bf16=bf16, lora_target_modules=["q_proj", "v_proj"])
    stats = finetune(str(tiny_model), TRAIN_CHATS, cfg, tmp_path / "model", tmp_path / "scratch", seed=0)
    assert stats["steps"] == 4 and stats["bf16"] == (bf16 == "on")
    assert stats["final_loss"] is not None and stats["final_loss"] == stats["final_loss"]  # not NaN
    assert is_adapter(tmp_path / "model")


def test_cached_gpu_memory_counts_as_free_and_is_returned_after_a_stage():
    from pipeline import memory

    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    memory.reset_gpu_peak()
    del block  # back in torch's cache, not yet the device's
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 256 * 2**20
    device_free = torch.cuda.mem_get_info()[0]
    assert hardware.free_memory_bytes(torch.device("cuda")) - device_free >= 256 * 2**20
    assert memory.gpu_peak_mib() >= 256
    reserved = torch.cuda.memory_reserved()
    memory.release_gpu_cache()
    assert torch.cuda.memory_reserved() <= reserved - 256 * 2**20
