"""The workloads, one test each, in the order the table lists them.

Each test times its workload with pytest-benchmark (``benchmark.pedantic``: one warm-up round,
then ``profile.rounds`` timed rounds) and hands the rounds to the session recorder, which turns
them into throughput, MFU and normalized throughput at the end (see ``conftest.py``).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from benchmarks.workloads import (
    LoraTrainer, Round, answer_chats, augment_chats, curate_config, curate_round, curation_pairs,
    demo_finetune_section, derived_engine, engine_dtype, engine_generate_round, hf_generate_round,
    naive_generate_round, training_chats,
)
from pipeline.engine import SamplingParams
from pipeline.hardware import bf16_native


def _augment_params(profile) -> SamplingParams:
    # configs/demo.yaml's augmentation sampling (the paper's temperature and top-p).
    return SamplingParams(max_new_tokens=profile.augment_new_tokens, temperature=0.7, top_p=0.9, seed=0)


def _answer_params(profile) -> SamplingParams:
    return SamplingParams(max_new_tokens=profile.answer_new_tokens, temperature=0.0)


def _describe(engine, what: str) -> str:
    weights = str(next(engine.model.parameters()).dtype).replace("torch.", "")
    return f"TransformersEngine, batch {engine.batch_size}, {weights} weights; {what}"


def _generation(run_timed, bench, profile, engine, name, chats, params, what, n_rounds=None, warmup=1):
    rounds = run_timed(lambda: engine_generate_round(engine, chats, params), n_rounds or profile.rounds, warmup)
    want = len(chats) * params.max_new_tokens
    assert all(r.new_tokens == want for r in rounds), (
        f"{name}: forcing {params.max_new_tokens} new tokens failed ({[r.new_tokens for r in rounds]} of {want})")
    bench.add(name, path=_describe(engine, what), counts="new_tokens", dtype=engine_dtype(engine), rounds=rounds)


def test_augment(run_timed, bench, profile, engine):
    chats = augment_chats(profile)
    what = (f"{len(chats)} backtranslation prompts (pydoc segments, 300-700 chars), "
            f"{profile.augment_new_tokens} new tokens forced, T=0.7 top-p 0.9")
    _generation(run_timed, bench, profile, derived_engine(engine), "augment", chats, _augment_params(profile), what)


def _naive(run_timed, bench, profile, engine, model, name, chats, params, what):
    """Reference: HF ``generate`` one prompt at a time, fp32. A short generate first, so the fp32
    kernels are warm without spending a whole slow round on warming up."""
    tok = engine.tokenizer
    naive_generate_round(model, tok, chats[:1], SamplingParams(max_new_tokens=8))
    rounds = run_timed(lambda: naive_generate_round(model, tok, chats, params), profile.rounds, warmup=0)
    bench.add(name, path=f"HF model.generate, one prompt at a time, fp32; {what}", counts="new_tokens",
              dtype="fp32", rounds=rounds)


def test_naive_augment(run_timed, bench, profile, engine, reference_model):
    chats = augment_chats(profile)[: profile.naive_prompts]
    what = f"first {len(chats)} augment prompts, {profile.augment_new_tokens} new tokens forced"
    _naive(run_timed, bench, profile, engine, reference_model, "naive_augment", chats, _augment_params(profile), what)


def test_answer(run_timed, bench, profile, engine):
    chats = answer_chats(profile)
    what = f"{len(chats)} seed instructions, {profile.answer_new_tokens} new tokens forced, greedy"
    _generation(run_timed, bench, profile, derived_engine(engine), "answer", chats, _answer_params(profile), what)


def test_naive_answer(run_timed, bench, profile, engine, reference_model):
    chats = answer_chats(profile)[: profile.naive_prompts]
    what = f"first {len(chats)} answer prompts, {profile.answer_new_tokens} new tokens forced, greedy"
    _naive(run_timed, bench, profile, engine, reference_model, "naive_answer", chats, _answer_params(profile), what)


@pytest.mark.parametrize("variant", ["fp32_weights", "hf_generate"])
def test_answer_variant(run_timed, bench, profile, engine, reference_model, variant):
    """Reference paths on the answer workload (full profile only): the engine with fp32 weights
    (separates batching from bf16), and the engine's batches decoded by transformers' own
    ``generate`` (what the engine's decoding loop replaced)."""
    if not profile.variants:
        pytest.skip("variants run in the full profile only")
    chats = answer_chats(profile)
    params = _answer_params(profile)
    what = f"{len(chats)} seed instructions, {profile.answer_new_tokens} new tokens forced, greedy"
    # Reference numbers only: a short warm-up call and fewer rounds keep the full run near 12 minutes.
    if variant == "fp32_weights":
        eng = derived_engine(engine, model=reference_model)
        engine_generate_round(eng, chats[:2], SamplingParams(max_new_tokens=8))
        _generation(run_timed, bench, profile, eng, "answer_fp32_weights", chats, params, what, n_rounds=1, warmup=0)
        return
    rounds = run_timed(lambda: hf_generate_round(engine, chats, params), min(2, profile.rounds), 0)
    bench.add("answer_hf_generate", path=f"transformers model.generate on the engine's batches ({_describe(engine, what)})",
              counts="new_tokens", dtype=engine_dtype(engine), rounds=rounds)


@pytest.mark.parametrize("mode", ["generate", "logprob"])
def test_curate(run_timed, bench, profile, engine, mode):
    cfg = curate_config(profile, mode)
    eng = derived_engine(engine, cfg.batch_size)
    pairs = curation_pairs(profile)
    rounds = run_timed(lambda: curate_round(eng, pairs, cfg), profile.rounds)
    scores = rounds[-1].extra["scores"]
    bench.scores[mode] = scores
    what = (f"pipeline.curate.score_pairs, CurateSection(mode={mode!r}"
            + (f", max_new_tokens={cfg.max_new_tokens}, not forced" if mode == "generate" else "")
            + f"), {len(pairs)} pairs (half seed pairs, half mismatched)")
    extra = {"scores": scores, "unscored": sum(s is None for s in scores),
             "new_tokens_per_pair": rounds[0].new_tokens / len(pairs)}
    bench.add(f"curate_{mode}", path=_describe(eng, what), counts="items", dtype=engine_dtype(eng),
              rounds=rounds, extra=extra)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_step(run_timed, bench, profile, model_path, dtype):
    if dtype == "bf16" and not bf16_native("cpu"):
        bench.unavailable["lora_bf16"] = "this CPU has no bf16 instructions"
        pytest.skip("no bf16 on this CPU")
    cfg = demo_finetune_section(profile)
    trainer = LoraTrainer(model_path, training_chats(profile), cfg, bf16=dtype == "bf16")
    bench.model["parameters"] = bench.model["parameters"] or trainer.base_parameters
    rounds = run_timed(trainer.round, profile.train_rounds)
    assert all(math.isfinite(x) for x in trainer.losses), trainer.losses
    bench.losses[dtype] = trainer.losses
    what = (f"Trainer-free step on pipeline.finetune.build_dataset + peft LoRA as finetune() builds it "
            f"(r={cfg.lora_r}, top {cfg.lora_layers} layers), {len(trainer.batches)} batches of "
            f"{cfg.batch_size}, max_seq_len {cfg.max_seq_len}, AdamW lr {cfg.learning_rate:g}"
            + (", bf16 base weights, bf16 autocast" if dtype == "bf16" else ", fp32"))
    bench.add(f"lora_{dtype}", path=what, counts="tokens", dtype=dtype, rounds=rounds,
              parameters=trainer.base_parameters, extra={"losses": [round(x, 5) for x in trainer.losses]})


def test_llama_cpp(run_timed, bench, profile, engine):
    """llama.cpp on the packaged GGUF file (its own Q4_1 weights), through llama-cpp-python when it
    is installed (``make bench`` tries to build it): one sequence at a time, which is what its
    Python API offers."""
    if profile.name == "quick":
        pytest.skip("llama.cpp is a reference for the full profile, not part of the regression check")
    try:
        import llama_cpp
    except ImportError as exc:
        bench.unavailable["llama_cpp"] = f"import llama_cpp failed ({exc}); llama-cpp-python is not installed"
        pytest.skip("llama.cpp not available: " + bench.unavailable["llama_cpp"])
    from pipeline.models import locate_package_file

    spec = bench.model["spec"]
    if not (spec.startswith("pkg:") and spec.endswith(".gguf")):
        bench.unavailable["llama_cpp"] = f"{spec} is not a packaged GGUF file, which llama.cpp would read"
        pytest.skip(bench.unavailable["llama_cpp"])
    gguf = locate_package_file(spec)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    chats = answer_chats(profile)[: profile.llama_cpp_prompts]
    n = profile.answer_new_tokens

    def one_round():
        start, prompt, new = time.perf_counter(), 0, 0
        for chat in chats:
            out = llm.create_chat_completion(chat, max_tokens=n, temperature=0.0,
                                             logit_bias={llm.token_eos(): -1e9})  # force n tokens
            prompt += out["usage"]["prompt_tokens"]
            new += out["usage"]["completion_tokens"]
        return Round(time.perf_counter() - start, len(chats), prompt, new)

    rounds = run_timed(one_round, profile.rounds)
    bench.add("llama_cpp_answer", path=(f"llama-cpp-python {llama_cpp.__version__}, {gguf.name} (Q4_1), one prompt "
                                        f"at a time, first {len(chats)} answer prompts, {n} new tokens forced"),
              counts="new_tokens", dtype="bf16", rounds=rounds)


@pytest.fixture(scope="session")
def vllm_engine(bench, profile, model_path, engine):
    """vLLM (its own environment, ``make vllm-env``) on the benchmarked model, in the project
    engine's dtype; skipped, and said so in the table, where it cannot start."""
    if profile.name == "quick":
        pytest.skip("vLLM is a reference for the full profile, not part of the regression check")
    from pipeline.vllm_engine import VllmEngine, VllmUnavailable

    dtype = "bfloat16" if engine_dtype(engine) == "bf16" else "float32"
    try:
        eng = VllmEngine(model_path, engine.tokenizer, dtype=dtype, device="cpu", kv_cache_gib=4,
                         max_num_seqs=profile.batch_size)
    except VllmUnavailable as exc:
        bench.unavailable["vllm"] = str(exc).splitlines()[0]
        pytest.skip("vLLM not available: " + bench.unavailable["vllm"])
    yield eng
    eng.close()


def _vllm_generation(run_timed, bench, profile, eng, name, chats, params, what):
    rounds = run_timed(lambda: engine_generate_round(eng, chats, params), profile.rounds)
    want = len(chats) * params.max_new_tokens
    assert all(r.new_tokens == want for r in rounds), (
        f"{name}: forcing {params.max_new_tokens} new tokens failed ({[r.new_tokens for r in rounds]} of {want})")
    bench.add(name, path=f"vLLM {eng.version} ({eng.dtype}, at most {profile.batch_size} sequences at once, "
                         f"prefix caching); {what}", counts="new_tokens",
              dtype="bf16" if eng.dtype == "bfloat16" else "fp32", rounds=rounds)


def test_vllm_augment(run_timed, bench, profile, vllm_engine):
    chats = augment_chats(profile)
    what = (f"the augment workload's {len(chats)} prompts, {profile.augment_new_tokens} new tokens forced, "
            "T=0.7 top-p 0.9")
    _vllm_generation(run_timed, bench, profile, vllm_engine, "vllm_augment", chats, _augment_params(profile), what)


def test_vllm_answer(run_timed, bench, profile, vllm_engine):
    chats = answer_chats(profile)
    what = f"the answer workload's {len(chats)} prompts, {profile.answer_new_tokens} new tokens forced, greedy"
    _vllm_generation(run_timed, bench, profile, vllm_engine, "vllm_answer", chats, _answer_params(profile), what)
