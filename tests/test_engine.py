import pytest
import torch

from pipeline.engine import SamplingParams, TransformersEngine
from pipeline.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=3)


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain tides in one long sentence please."}],
    [{"role": "user", "content": "What is the capital of France, and why is it that city?"}],
    [{"role": "user", "content": "Count to three."}],
]


def test_batched_greedy_equals_one_at_a_time(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    batched = engine.generate(CHATS, params)
    single = [engine.generate([c], params)[0] for c in CHATS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.new_tokens <= 12 for c in batched)


def test_sampling_is_reproducible_by_seed(engine):
    a = engine.generate(CHATS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3))
    b = engine.generate(CHATS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3))
    assert [x.text for x in a] == [x.text for x in b]


def test_stop_strings_cut_and_mark_finished(engine):
    out = engine.generate(CHATS[:1], SamplingParams(max_new_tokens=20))[0]
    if len(out.text) < 3:
        pytest.skip("tiny model produced too little text to cut")
    stop = out.text[1:3]
    cut = engine.generate(CHATS[:1], SamplingParams(max_new_tokens=20, stop=(stop,)))[0]
    assert stop not in cut.text and cut.finished
    assert out.text.startswith(cut.text)


def test_choice_probs_match_a_manual_forward_pass(engine):
    choices = [" 1", " 2", " 3", " 4", " 5"]
    probs = engine.choice_probs(CHATS, "Score:", choices)
    assert len(probs) == len(CHATS) and all(len(p) == 5 for p in probs)
    assert all(0 < sum(p) <= 1 + 1e-6 for p in probs)
    # The same numbers from an unbatched, unpadded forward pass.
    tok = engine.tokenizer
    for chat, got in zip(CHATS, probs):
        feed, heads = engine._split_choices(engine.render(chat), "Score:", choices)
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([feed])).logits[0, -1]
        want = torch.softmax(logits.float(), -1)[heads].tolist()
        assert got == pytest.approx(want, abs=1e-5)
        assert tok.decode(feed).endswith("Score:") or tok.decode(feed + [heads[0]]).endswith("Score: 1")


def test_choices_must_differ(engine):
    with pytest.raises(ValueError, match="distinct"):
        engine.choice_probs(CHATS[:1], "Score:", [" 1", " 1"])


def test_batches_respect_the_kv_cache_budget(tiny_model):
    eng = TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=4)
    per_token = eng.kv_bytes_per_token()
    cfg = eng.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32
    ids = [[1] * n for n in (10, 40, 20, 30, 5, 35)]
    # No budget: batch_size alone, longest first.
    assert TransformersEngine._batches(eng, ids) == [[1, 5, 3, 2], [0, 4]]
    # Budget of 100 padded tokens with 10 new tokens: widths 50 (2 fit), then 40 (2), then 20 (5 would).
    eng.kv_cache_gib = 100 * per_token / 2**30
    assert eng.max_batch_tokens() == 100
    assert eng._batches(ids, new_tokens=10) == [[1, 5], [3, 2], [0, 4]]
    # A sequence over the budget alone still runs, in a batch of its own.
    eng.kv_cache_gib = 30 * per_token / 2**30
    assert eng._batches(ids, new_tokens=10) == [[1], [5], [3], [2], [0], [4]]
    # Generation under a tight budget gives the same greedy text as without one.
    params = SamplingParams(max_new_tokens=6)
    eng.kv_cache_gib = None
    free = [c.text for c in eng.generate(CHATS, params)]
    eng.kv_cache_gib = 40 * per_token / 2**30
    assert [c.text for c in eng.generate(CHATS, params)] == free


def test_auto_kv_budget_is_half_the_free_memory_when_built(tiny_model, monkeypatch):
    from pipeline import hardware

    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: 6 * 2**30)
    eng = TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), kv_cache_gib="auto")
    assert eng.kv_cache_gib == 3.0
    assert eng.max_batch_tokens() == int(3 * 2**30 / eng.kv_bytes_per_token())


def test_shared_prefix_computed_once_gives_the_same_results(tiny_model):
    """A long system prompt shared by every chat: computing it once per batch changes nothing."""
    system = {"role": "system", "content": "Rate the answer below carefully on the five-point scale. " * 4}
    chats = [[system, *c[-1:]] for c in CHATS]
    plain = TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=4,
                               min_shared_prefix=0)
    shared = TransformersEngine(plain.model, plain.tokenizer, batch_size=4, min_shared_prefix=8)
    ids = shared._encode([shared.render(c) for c in chats])
    _, _, prefix = shared._layout(ids)
    assert prefix >= 40  # the rendered system turn
    params = SamplingParams(max_new_tokens=8)
    assert [c.text for c in shared.generate(chats, params)] == [c.text for c in plain.generate(chats, params)]
    assert shared.stats["prefix_tokens_reused"] == prefix * 3 and plain.stats["prefix_tokens_reused"] == 0
    choices = [" 1", " 2", " 3"]
    got, want = shared.choice_probs(chats, "Score:", choices), plain.choice_probs(chats, "Score:", choices)
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)


def test_generate_tokens_takes_rendered_token_ids(engine):
    params = SamplingParams(max_new_tokens=10)
    ids = engine._encode([engine.render(c) for c in CHATS])
    before = engine.stats["new_tokens"]
    tokens = engine.generate_tokens(ids, params)
    counted = engine.stats["new_tokens"] - before
    texts = [c.text for c in engine.generate(CHATS, params)]
    eos = set(engine._eos_ids())
    assert [engine.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True).strip()
            for row in tokens] == texts
    assert counted == sum(len(row) - (row[-1] in eos) for row in tokens)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate_tokens([ids[0], []], params)


class _SplitsMarkerTokenizer:
    """A tokenizer whose ChatML template's end-of-turn marker is plain text (several tokens)."""

    def __init__(self, template: str, pieces: int):
        self.chat_template = template
        self.pieces = pieces

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(self.pieces))}


def test_turn_end_is_a_stop_string_only_where_it_is_plain_text(engine, monkeypatch):
    from pipeline import engine as engine_module
    from pipeline.models import CHATML_TEMPLATE

    assert engine_module.turn_end_stops(_SplitsMarkerTokenizer(CHATML_TEMPLATE, 5)) == ("<|im_end|>",)
    assert engine_module.turn_end_stops(_SplitsMarkerTokenizer(CHATML_TEMPLATE, 1)) == ()
    assert engine_module.turn_end_stops(_SplitsMarkerTokenizer("{{ messages }}", 5)) == ()
    assert engine_module.turn_end_stops(engine.tokenizer) == ()  # the tiny model's marker is its EOS token
    # where it is plain text, generation stops at it like at any stop string, and the text is cut there
    # (here a marker that is plain text to the tiny tokenizer stands in for Gemma's "<|im_end|>")
    monkeypatch.setattr(engine_module, "turn_end_stops", lambda tok: ("<END>",))
    assert engine._stops(SamplingParams(stop=("x",))) == ("x", "<END>")
    tokens = engine.tokenizer("hello<END>more", add_special_tokens=False)["input_ids"]
    done = engine._completion(tokens, SamplingParams())
    assert done.finished and done.text == "hello"
    check = engine._stop_check(engine._stops(SamplingParams()))  # applied as each token arrives
    assert check(engine.tokenizer("hello<END>", add_special_tokens=False)["input_ids"])
    assert not check(engine.tokenizer("hello<EN", add_special_tokens=False)["input_ids"])


def test_engine_backend_resolution(monkeypatch):
    from harness.config import RunConfig
    from harness.stages import backend_settings, engine_backend

    cpu = RunConfig.model_validate({"engine": {"device": "cpu"}})
    assert engine_backend(cpu) == "transformers"  # measured faster than vLLM on a CPU
    assert backend_settings(cpu) == {}  # stages computed before backends existed stay valid
    chosen = RunConfig.model_validate({"engine": {"device": "cpu", "backend": "vllm"}})
    assert engine_backend(chosen) == "vllm" and backend_settings(chosen) == {"engine_backend": "vllm"}
    # auto on a GPU without a vLLM environment falls back to the in-process engine
    monkeypatch.setenv("HUMPBACK_VLLM_PYTHON", "")
    import pipeline.vllm_engine as ve

    monkeypatch.setattr(ve, "DEFAULT_ENV", ve.Path("/nonexistent-vllm-env"))
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    gpu = RunConfig.model_validate({"engine": {"device": "cuda"}})
    assert engine_backend(gpu) == "transformers"


def test_vllm_child_preloads_its_own_environments_openmp(tmp_path):
    # A venv's bin/python is a symlink to the base interpreter: the library is looked up in the
    # venv, not beside the interpreter the link points to.
    import sys

    from pipeline.vllm_engine import worker_env

    (tmp_path / "bin").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    env = worker_env(str(tmp_path / "bin" / "python"), "cpu", 2.5)
    assert env["LD_PRELOAD"].split(":")[0] == str(tmp_path / "lib" / "libiomp5.so")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    import os

    gpu = worker_env(str(tmp_path / "bin" / "python"), "cuda", None)
    assert gpu.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")  # the CPU runtime only for the CPU build
