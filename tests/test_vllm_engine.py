"""The vLLM engine against the in-process engine, through the same interface, on a tiny model.

vLLM runs in its own environment (``make vllm-env``; ``make test`` creates it and sets
HUMPBACK_REQUIRE_VLLM=1, so a missing or broken environment fails here instead of skipping).
Both engines run in fp32 on the CPU, so they may differ only by kernel arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.engine import SamplingParams, TransformersEngine
from pipeline.models import load_model, load_tokenizer
from pipeline.vllm_engine import VllmEngine, VllmUnavailable, find_python
from conftest import build_tiny_model

pytestmark = pytest.mark.slow


def _python() -> str:
    try:
        return find_python()
    except VllmUnavailable as exc:
        if os.environ.get("HUMPBACK_REQUIRE_VLLM"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vLLM's CPU attention has no kernel for heads narrower than 32 dimensions.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), hidden_size=64, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def engines(model_dir):
    python = _python()
    reference = TransformersEngine(load_model(str(model_dir), dtype=torch.float32), load_tokenizer(str(model_dir)),
                                   batch_size=3)
    with VllmEngine(str(model_dir), load_tokenizer(str(model_dir)), dtype="float32", python=python,
                    enforce_eager=True, kv_cache_gib=1) as served:
        yield reference, served


CHATS = [[{"role": "user", "content": f"Tell me about harbour {i}. " + "Waves and wind. " * i}] for i in range(7)]


def test_greedy_tokens_match_the_in_process_engine(engines):
    reference, served = engines
    params = SamplingParams(max_new_tokens=32)
    prompts = reference._encode([reference.render(c) for c in CHATS])
    assert served._encode([served.render(c) for c in CHATS]) == prompts
    expected = reference.generate_tokens(prompts, params)
    before = served.stats["new_tokens"]
    got = served.generate_tokens(prompts, params)
    assert got == expected
    ended = sum(1 for t in got if t and t[-1] in served._eos)
    assert served.stats["new_tokens"] - before == sum(len(t) for t in got) - ended
    assert served.generate(CHATS, params) == reference.generate(CHATS, params)


def test_stop_strings_cut_where_the_in_process_engine_cuts(engines):
    reference, served = engines
    free = reference.generate(CHATS, SamplingParams(max_new_tokens=32))
    # A stop string taken from the middle of each free-running text: both engines must end there.
    stops = tuple(sorted({c.text[6:8] for c in free if len(c.text) > 10 and c.text[6:8].strip()}))
    assert stops, [c.text for c in free]
    params = SamplingParams(max_new_tokens=32, stop=stops)
    expected = reference.generate(CHATS, params)
    got = served.generate(CHATS, params)
    assert got == expected
    assert sum(c.finished for c in got) >= len(stops)


def test_choice_probabilities_match(engines):
    reference, served = engines
    choices = ["1", "2", "3", "4", "5"]
    expected = reference.choice_probs(CHATS, "Score: ", choices)
    got = served.choice_probs(CHATS, "Score: ", choices)
    assert len(got) == len(CHATS) and all(len(row) == 5 for row in got)
    worst = max(abs(a - b) for r, s in zip(expected, got) for a, b in zip(r, s))
    assert worst < 1e-5, (expected, got)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engines):
    _, served = engines
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    first = served.generate(CHATS, params)
    assert served.generate(CHATS, params) == first
    # A prompt's sample depends on its seed (the request's seed plus its position), not on the
    # other prompts sent with it.
    assert served.generate(CHATS[:3], params) == first[:3]
    greedy = served.generate(CHATS, SamplingParams(max_new_tokens=16))
    assert first != greedy  # sampling did sample


def test_lora_adapter_is_served_on_the_base(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    python = _python()
    base = load_model(str(model_dir), dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    merged = TransformersEngine(load_model(str(adapter), dtype=torch.float32), load_tokenizer(str(model_dir)))
    plain = TransformersEngine(load_model(str(model_dir), dtype=torch.float32), load_tokenizer(str(model_dir)))
    params = SamplingParams(max_new_tokens=24)
    expected = merged.generate(CHATS, params)
    assert expected != plain.generate(CHATS, params)  # the adapter changes what the model writes
    with VllmEngine(str(model_dir), load_tokenizer(str(model_dir)), adapter=str(adapter), dtype="float32",
                    python=python, enforce_eager=True, kv_cache_gib=1) as served:
        assert served.generate(CHATS, params) == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_vllm_on_cuda_matches_the_in_process_engine(model_dir):
    """On a GPU, with a CUDA build of vLLM (``make vllm-env VLLM=vllm==<version> VLLM_TORCH=<CUDA torch>
    VLLM_CONSTRAINTS=``): fp32 greedy tokens and choice probabilities as the in-process engine's on
    the same GPU, and a second GPU used for tensor parallelism where there is one."""
    python = _python()
    reference = TransformersEngine(load_model(str(model_dir), dtype=torch.float32).to("cuda"),
                                   load_tokenizer(str(model_dir)), batch_size=4)
    params = SamplingParams(max_new_tokens=32)
    expected = reference.generate(CHATS, params)
    probs = reference.choice_probs(CHATS, "Score: ", ["1", "2", "3", "4", "5"])
    tp = 2 if torch.cuda.device_count() >= 2 else 1
    with VllmEngine(str(model_dir), load_tokenizer(str(model_dir)), dtype="float32", device="cuda", python=python,
                    tensor_parallel_size=tp, gpu_memory_utilization=0.3) as served:
        assert served.generate(CHATS, params) == expected
        got = served.choice_probs(CHATS, "Score: ", ["1", "2", "3", "4", "5"])
    assert max(abs(a - b) for r, s in zip(probs, got) for a, b in zip(r, s)) < 1e-4
