"""lm-eval's generation requests answered by the engine: the same answers as lm-eval's own
``generate`` path on the same fp32 model, stop sequences and EOS cut the same way, unsupported
settings handed back to lm-eval, answers in request order and through lm-eval's cache hook."""

from __future__ import annotations

import pytest

from evals import lm_eval_runner

PROMPTS = [
    "<|im_start|>user\nWhy does ice float on water?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what causes ocean tides, in two sentences.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a prime number larger than ten and say why "
    "it is prime.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\n",
]


def requests(gen_kwargs_list):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (prompt, dict(kwargs)), i)
            for i, (prompt, kwargs) in enumerate(zip(PROMPTS, gen_kwargs_list))]


@pytest.fixture(scope="module")
def models(tiny_model):
    spec = lm_eval_runner.resolve_model(str(tiny_model))
    return {g: lm_eval_runner.build_lm(spec, batch_size=2, device="cpu", generation=g) for g in lm_eval_runner.GENERATION}


class Recorder:
    def __init__(self):
        self.calls = []

    def add_partial(self, attr, req, res):
        self.calls.append((attr, req, res))


def test_greedy_answers_equal_lm_evals_own(models):
    greedy = {"until": ["Question:"], "max_gen_toks": 24, "do_sample": False, "temperature": 0.0}
    mixed = [greedy, greedy, {**greedy, "max_gen_toks": 7}, greedy, {**greedy, "max_gen_toks": 7}]
    theirs = models["lm_eval"].generate_until(requests(mixed))
    ours = models["engine"].generate_until(requests(mixed))
    assert ours == theirs
    assert any(len(a) > 20 for a in ours)  # real continuations, not empty strings


def test_stop_sequences_cut_like_lm_eval(models):
    # The tiny model's text has spaces and "e"s: every answer is cut somewhere.
    for stop in (" ", "e"):
        kwargs = [{"until": [stop], "max_gen_toks": 24, "do_sample": False}] * len(PROMPTS)
        theirs = models["lm_eval"].generate_until(requests(kwargs))
        ours = models["engine"].generate_until(requests(kwargs))
        assert ours == theirs
        assert all(stop not in a for a in ours)


def test_answers_reach_lm_evals_cache_hook_in_order(models, monkeypatch):
    lm = models["engine"]
    recorder = Recorder()
    monkeypatch.setattr(lm, "cache_hook", recorder)
    kwargs = [{"until": [], "max_gen_toks": 5, "do_sample": False}] * len(PROMPTS)
    answers = lm.generate_until(requests(kwargs))
    assert [c[0] for c in recorder.calls] == ["generate_until"] * len(PROMPTS)
    assert {c[1][0]: c[2] for c in recorder.calls} == dict(zip(PROMPTS, answers))


def _spy_fallback(lm, monkeypatch) -> list[int]:
    handed_back: list[int] = []
    parent = type(lm).__mro__[1]
    real = parent.generate_until

    def spy(self, reqs, disable_tqdm=False):
        handed_back.append(len(reqs))
        return real(self, reqs, disable_tqdm)

    monkeypatch.setattr(parent, "generate_until", spy)
    return handed_back


def test_unsupported_settings_go_through_lm_evals_generate(models, monkeypatch):
    lm = models["engine"]
    handed_back = _spy_fallback(lm, monkeypatch)
    plain = {"until": [], "max_gen_toks": 4, "do_sample": False}
    beams = {"until": [], "max_gen_toks": 4, "do_sample": False, "num_beams": 2}
    answers = lm.generate_until(requests([plain, beams, plain, beams, plain]))
    assert handed_back == [2] and len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)


def test_a_generation_config_penalty_sends_requests_to_lm_eval(models, monkeypatch):
    """A repetition penalty in the model's generation config would change lm-eval's own greedy
    answers; the engine has none, so those requests are lm-eval's, with the same answers."""
    lm = models["engine"]
    greedy = [{"until": [], "max_gen_toks": 12, "do_sample": False}] * len(PROMPTS)
    unpenalized = models["lm_eval"].generate_until(requests(greedy))
    handed_back = _spy_fallback(lm, monkeypatch)
    monkeypatch.setattr(lm.model.generation_config, "repetition_penalty", 1.5)
    ours = lm.generate_until(requests(greedy))
    assert handed_back == [len(PROMPTS)]
    monkeypatch.setattr(models["lm_eval"].model.generation_config, "repetition_penalty", 1.5)
    assert ours == models["lm_eval"].generate_until(requests(greedy)) != unpenalized


def test_sampled_requests_stay_with_the_engine_only_without_top_k(models, monkeypatch):
    lm = models["engine"]
    handed_back = _spy_fallback(lm, monkeypatch)
    sampled = [{"until": [], "max_gen_toks": 4, "do_sample": True, "temperature": 0.7}] * len(PROMPTS)
    lm.generate_until(requests(sampled))
    assert handed_back == [len(PROMPTS)]  # transformers would sample from the top 50
    monkeypatch.setattr(lm.model.generation_config, "top_k", 0)
    answers = lm.generate_until(requests(sampled))
    assert handed_back == [len(PROMPTS)] and len(answers) == len(PROMPTS)


def test_config_differences():
    from transformers import GenerationConfig

    from evals.engine_generation import config_differences

    assert config_differences(GenerationConfig(), sample=False) == []
    assert config_differences(GenerationConfig(), sample=True) == ["top_k=50"]
    assert config_differences(GenerationConfig(top_k=0, top_p=0.9, temperature=0.6), sample=True) == []
    tuned = GenerationConfig(repetition_penalty=1.05, top_k=20, min_p=0.05, no_repeat_ngram_size=1)
    assert config_differences(tuned, sample=False) == ["repetition_penalty=1.05", "no_repeat_ngram_size=1"]
    assert config_differences(tuned, sample=True) == ["repetition_penalty=1.05", "no_repeat_ngram_size=1",
                                                      "min_p=0.05", "top_k=20"]
    assert config_differences(None, sample=False) == []


def test_generation_choice_enters_settings_with_heldout_tasks(eval_data):
    from harness import evaluate
    from harness.config import load_config

    base = [f"eval.data_dir={eval_data}"]
    engine = evaluate.eval_settings(load_config(None, base))
    stock = evaluate.eval_settings(load_config(None, [*base, "eval.heldout_generation=lm_eval"]))
    assert engine["heldout_generation"] == "engine_v1"
    assert stock == {**engine, "heldout_generation": "lm_eval"}
    no_heldout = evaluate.eval_settings(load_config(None, [*base, "eval.heldout_tasks=[]"]))
    assert "heldout_generation" not in no_heldout
