"""``humpback eval`` with an API judge, offline.

The OpenAI endpoint is faked where the network would be reached (the HTTP transport under the
openai client), so alpaca_eval's own ``openai_completions`` decoder, the openai client and its
response parsing all run for real; the fake answers like ``weighted_alpaca_eval_gpt4_turbo``
expects, with the log-probabilities of "m" and "M" as the first token.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from harness import evaluate
from harness.config import load_config

pytestmark = pytest.mark.usefixtures("no_network")

API_JUDGE = "weighted_alpaca_eval_gpt4_turbo"

# The two outputs as alpaca_eval's template for this judge shows them ("m" first, "M" second).
_SHOWN = re.compile(r'"model_identifier": "m",\s*"output": """(.*)"""\s*},\s*\{\s*'
                    r'"model_identifier": "M",\s*"output": """(.*)"""\s*}\s*}', re.DOTALL)


def canned_p_first(first: str, second: str) -> float:
    """The fake judge's probability that the first output shown is the better one: 0.8 for the
    shorter one, 0.5 on equal length, so every preference it gives is known in advance."""
    if len(first) == len(second):
        return 0.5
    return 0.8 if len(first) < len(second) else 0.2


def _chat_completion(model: str, p_first: float) -> dict:
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
           for t, p in (("m", p_first), ("M", 1.0 - p_first))]
    best = max(top, key=lambda t: t["logprob"])
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": best["token"]},
                     "logprobs": {"content": [{**best, "top_logprobs": top}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }


@pytest.fixture
def fake_openai(monkeypatch) -> list[tuple[str, str]]:
    """Every chat completion request answered by :func:`canned_p_first`; returns the pairs shown."""
    import httpx2

    shown: list[tuple[str, str]] = []

    def handle_request(self, request):
        assert request.url.path.endswith("/chat/completions"), request.url
        assert request.headers["authorization"] == "Bearer sk-fake-offline"
        body = json.loads(request.content)
        match = _SHOWN.search("\n".join(m["content"] for m in body["messages"]))
        assert match is not None, "prompt does not follow weighted_alpaca_eval_gpt4_turbo's template"
        first, second = match.groups()
        shown.append((first, second))
        return httpx2.Response(200, json=_chat_completion(body["model"], canned_p_first(first, second)),
                               request=request)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-offline")
    monkeypatch.setattr(httpx2.HTTPTransport, "handle_request", handle_request)
    return shown


@pytest.fixture
def judge_model_loads(monkeypatch) -> list[str]:
    """Every attempt to resolve or load a local judge model, recorded (and none performed)."""
    from evals.alpaca import judge

    calls: list[str] = []

    def resolving(where):
        def spy(spec, *args, **kwargs):
            calls.append(f"{where}({spec!r})")
            return spec
        return spy

    def loading(method):
        def spy(self, *args, **kwargs):
            calls.append(f"Judge.{method} of {self.annotators_config}")
            raise AssertionError(f"Judge.{method} called for {self.annotators_config}")
        return spy

    monkeypatch.setattr(evaluate, "resolve_base", resolving("harness.evaluate.resolve_base"))
    monkeypatch.setattr(judge, "resolve_base", resolving("evals.alpaca.judge.resolve_base"))
    monkeypatch.setattr(judge.Judge, "resolved_model", loading("resolved_model"))
    monkeypatch.setattr(judge.Judge, "get_engine", loading("get_engine"))
    return calls


def test_api_judge_scores_without_any_local_judge_model(tiny_model, eval_data, tmp_path, fake_openai,
                                                          judge_model_loads):
    from evals import alpaca

    cfg = load_config(None, [f"eval.judge={API_JUDGE}", "eval.data_dir=packaged", "eval.alpaca_subset=3",
                             "eval.max_new_tokens=8", "eval.batch_size=4", "eval.judge_check_pairs=1",
                             "eval.judge_calibration_pairs=2",
                             "eval.heldout_tasks=[]", "eval.alpaca_lc_glm=length_controlled_minimal",
                             "engine.bf16=off", "engine.device=cpu"])
    summary = evaluate.evaluate_standalone(cfg, str(tiny_model), tmp_path / "eval")

    # The judge is the API: no judge model was resolved (model.base is a GGUF file that would have
    # been converted) nor loaded, in the judge check or in the evaluation.
    assert judge_model_loads == []
    scored = json.loads((tmp_path / "eval" / "model" / "eval" / "alpaca" / "alpaca_eval.json").read_text())
    assert scored["provenance"]["annotators_config"] == API_JUDGE
    assert scored["provenance"]["judge_model"] is None and scored["provenance"]["judge_model_digest"] is None

    # The win rate is the fake's: the model's answer gets 0.8 when shorter than the reference's.
    reference = alpaca.load_instruction_set(eval_data, cfg.eval.alpaca_reference, 3, cfg.eval.seed).reference
    answers = [json.loads(line) for line in
               (tmp_path / "eval" / "model" / "eval" / "alpaca" / "model_outputs.jsonl").read_text().splitlines()]
    pairs = [(r["output"], a["output"]) for r, a in zip(reference, answers)]
    assert [r["instruction"] for r in reference] == [a["instruction"] for a in answers]
    for ref, mine in pairs:
        assert (ref, mine) in fake_openai or (mine, ref) in fake_openai
    expected = 100 * sum(canned_p_first(mine, ref) for ref, mine in pairs) / len(pairs)
    win_rate = summary["metrics"]["alpaca_eval/win_rate"]
    assert win_rate["value"] == pytest.approx(expected, abs=1e-4) and win_rate["n"] == 3
    annotations = json.loads((tmp_path / "eval" / "model" / "eval" / "alpaca" / "annotations.json").read_text())
    assert sorted(round(a["preference"], 6) for a in annotations) == sorted(
        round(2 - canned_p_first(ref, mine), 6) for ref, mine in pairs)

    # The judge check went through the same fake: one record, three corruptions, both orders.
    check = json.loads((tmp_path / "eval" / "judge_check" / "judge_check.json").read_text())
    assert check["n_judgments"] == 6 and check["n_missing"] == 0
    # ... and so did the calibration: 2 labelled pairs from each of 3 sources, both orders.
    calibration = json.loads((tmp_path / "eval" / "judge_check" / "calibration.json").read_text())
    assert calibration["pairs"] == {"llmbar_natural": 2, "llmbar_mtbench": 2, "alpaca_eval_gpt4": 2}
    assert calibration["groups"]["human"]["judges"][API_JUDGE]["n_pairs"] == 4
    assert len(fake_openai) == 2 * 3 + 6 + 12  # the 3 evaluation pairs in both orders
