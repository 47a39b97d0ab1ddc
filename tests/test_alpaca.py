"""AlpacaEval: answers through the engine, judged and scored by alpaca_eval, offline.

The fake judge (prefers the longer output, the first on a tie) goes through the real alpaca_eval
path, so win rates, caching and the judge check can be asserted exactly; the local judge runs
end to end on the tiny random model.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evals import alpaca  # noqa: E402
from pipeline.engine import TransformersEngine  # noqa: E402
from pipeline.models import load_model, load_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("no_network")


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def planted_pairs() -> tuple[list[dict], list[dict]]:
    """Six pairs: the model's answer is longer on four, shorter on one, identical on one."""
    reference, model = [], []
    lengths = [(3, 9), (4, 12), (2, 5), (6, 7), (9, 2), (5, 5)]
    for i, (ref_len, model_len) in enumerate(lengths):
        instruction = f"planted instruction {i}"
        ref_out = words(ref_len)
        model_out = ref_out if i == 5 else words(model_len, start=100)
        reference.append({"instruction": instruction, "output": ref_out, "generator": "ref", "dataset": "planted"})
        model.append({"instruction": instruction, "output": model_out, "generator": "mine", "dataset": "planted"})
    return model, reference


def test_fake_judge_win_rate_matches_hand_computation(tmp_path):
    model, reference = planted_pairs()
    result = alpaca.score_alpaca_eval(model, reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)
    # Preferences 2,2,2,2 (model longer), 1 (shorter), 1.5 (identical): mean of (p - 1) = 4.5 / 6.
    assert result["win_rate"] == pytest.approx(75.0)
    values = [1, 1, 1, 1, 0, 0.5]
    sem = math.sqrt(sum((v - 0.75) ** 2 for v in values) / 5 / 6)
    assert result["standard_error"] == pytest.approx(100 * sem, abs=1e-4)
    assert (result["n"], result["n_wins"], result["n_wins_base"], result["n_draws"]) == (6, 4, 1, 1)
    assert result["n_missing"] == 0
    # Both orders of each pair (the identical pair's draw alpaca_eval sets without asking).
    assert result["judged_now"] == 12 and result["reused_from_cache"] == 0 and result["orders"] == "both"


def test_both_orders_cancel_a_judge_that_always_picks_the_first(tmp_path, monkeypatch):
    """A judge certain of whichever output it sees first: averaged over both orders every pair
    is a draw (win rate 50); judged once in alpaca_eval's random order it is a coin flip per pair."""
    import shutil

    from evals.alpaca import judge as judge_module

    def always_first(prompts, *, choices=("m", "M"), **_):
        return judge_module._completions_result(
            [judge_module._logprob_completion(choices, [1.0, 0.0]) for _ in prompts], 0.0)

    config = tmp_path / "configs" / alpaca.FAKE_JUDGE  # its template path is relative to the parent folder
    shutil.copytree(alpaca.ANNOTATORS_DIR / alpaca.FAKE_JUDGE, config)
    monkeypatch.setitem(judge_module.COMPLETION_FNS, "humpback_longest_completions", always_first)
    model, reference = planted_pairs()
    both = alpaca.score_alpaca_eval(model, reference, tmp_path / "both", annotators_config=str(config))
    assert both["win_rate"] == pytest.approx(50.0) and both["n_draws"] == 6
    annotations = json.loads((tmp_path / "both" / "annotations.json").read_text())
    judged = [a for a in annotations if a["output_1"] != a["output_2"]]
    assert {a["preference_reference_first"] for a in judged} == {1.0}
    assert {a["preference_reference_second"] for a in judged} == {2.0}
    one = alpaca.score_alpaca_eval(model, reference, tmp_path / "one", annotators_config=str(config), both_orders=False)
    assert one["orders"] == "random" and one["n_draws"] == 1  # only the identical pair


def test_score_result_shape_and_files(tmp_path):
    model, reference = planted_pairs()
    result = alpaca.score_alpaca_eval(model, reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)
    prov = result["provenance"]
    assert prov["annotators_config"] == alpaca.FAKE_JUDGE
    assert len(prov["annotators_config_digest"]) == 16
    assert prov["alpaca_eval_version"] == "0.6.6"
    assert prov["generator"] == "mine" and prov["n_instructions"] == 6
    # Offline, with no AlpacaEval indices: the minimal GLM, and the reason v1 was not used.
    assert result["lc_glm"] == "length_controlled_minimal"
    assert "indices" in result["lc_unavailable_reason"]
    assert 0 <= result["length_controlled_win_rate"] <= 100
    assert prov["lc_note"] == alpaca.LC_NOTES["length_controlled_minimal"]
    saved = json.loads((tmp_path / "alpaca_eval.json").read_text())
    assert saved["win_rate"] == result["win_rate"]
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert [a["instruction"] for a in annotations] == [r["instruction"] for r in reference]


@pytest.fixture
def judged(monkeypatch):
    """Prompts each of our completion functions receives, counted by a spy around it."""
    from evals.alpaca import judge as judge_module

    counts: Counter[str] = Counter()
    for name, fn in list(judge_module.COMPLETION_FNS.items()):
        def spy(prompts, *args, _name=name, _fn=fn, **kwargs):
            counts[_name] += len(prompts)
            return _fn(prompts, *args, **kwargs)
        monkeypatch.setitem(judge_module.COMPLETION_FNS, name, spy)
    return counts


def test_rerun_judges_nothing_again(tmp_path, judged):
    model, reference = planted_pairs()
    first = alpaca.score_alpaca_eval(model, reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)
    calls = judged["humpback_longest_completions"]
    assert calls == 10  # six pairs in both orders; the identical one is a draw alpaca_eval never sends
    second = alpaca.score_alpaca_eval(model, reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)
    assert judged["humpback_longest_completions"] == calls
    assert second["judged_now"] == 0 and second["reused_from_cache"] == 12
    assert second["win_rate"] == first["win_rate"]
    # One changed answer: only that pair is judged, in its two orders.
    model[0] = {**model[0], "output": "a different answer"}
    third = alpaca.score_alpaca_eval(model, reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)
    assert judged["humpback_longest_completions"] == calls + 2
    assert third["judged_now"] == 2


def test_mismatched_outputs_are_refused(tmp_path):
    model, reference = planted_pairs()
    with pytest.raises(ValueError, match="differ"):
        alpaca.score_alpaca_eval(model[:-1], reference, tmp_path, annotators_config=alpaca.FAKE_JUDGE)


def test_judge_config_errors(tmp_path):
    with pytest.raises(alpaca.JudgeError, match="not found"):
        alpaca.Judge("no_such_judge").config_path
    with pytest.raises(alpaca.JudgeError, match="judge model"):
        alpaca.Judge(alpaca.LOCAL_JUDGE).annotator(None)
    # alpaca_eval's own configs resolve by name; the GPT-4 ones need a key.
    judge = alpaca.Judge("weighted_alpaca_eval_gpt4_turbo")
    assert judge.config_path.parent.name == "weighted_alpaca_eval_gpt4_turbo"
    if not os.environ.get("OPENAI_API_KEY"):
        with pytest.raises(alpaca.JudgeError, match="OPENAI_API_KEY"):
            judge.annotator(None)


def test_aggregation_reproduces_the_leaderboard(eval_data):
    """alpaca_eval's metrics on the real GPT-4 judgments of alpaca-7b give the published row."""
    path = eval_data / "preferences" / "alpaca_eval_gpt4" / "alpaca-7b.json.gz"
    metrics = alpaca.win_rate_metrics(json.loads(gzip.decompress(path.read_bytes())))
    assert metrics["win_rate"] == pytest.approx(26.459627329192543, abs=1e-6)
    assert metrics["standard_error"] == pytest.approx(1.535711469748, abs=1e-6)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"], metrics["n"]) == (205, 584, 16, 805)


def test_instruction_subset_is_seeded_and_shared(eval_data):
    a = alpaca.load_instruction_set(eval_data, "text_davinci_003", subset_size=10, seed=3)
    b = alpaca.load_instruction_set(eval_data, "gpt4_turbo", subset_size=10, seed=3)
    c = alpaca.load_instruction_set(eval_data / "alpaca_eval", "text_davinci_003", subset_size=10, seed=4)
    assert a.indices == b.indices == sorted(a.indices) and len(a.indices) == 10
    assert a.indices != c.indices
    assert [r["instruction"] for r in a.reference] == [r["instruction"] for r in b.reference]
    assert {r["generator"] for r in a.reference} == {"text_davinci_003"}
    assert {r["generator"] for r in b.reference} == {"gpt4_1106_preview"}
    assert a.select(b.reference) == b.reference
    full = alpaca.load_instruction_set(eval_data, "text_davinci_003")
    assert len(full.instructions) == 805 and full.indices == list(range(805))


def test_length_controlled_path_with_local_glm_files(tmp_path):
    """With the GLM's hub files in lc_data_dir, alpaca_eval fits it offline. The file here is
    synthetic (plumbing only: the real one is tatsu-lab/alpaca_eval's df_gamed.csv)."""
    import random

    rng = random.Random(0)
    lines = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for model in ("gamed_long", "gamed_short"):
        for i in range(805):
            delta = rng.gauss(1.0 if model == "gamed_long" else -1.0, 0.5)
            pref = 1 / (1 + math.exp(-delta))
            lines.append(f"{model},{i},{pref:.4f},{delta:.4f},{(i % 7) / 7:.4f},False")
    (tmp_path / "df_gamed.csv").write_text("\n".join(lines) + "\n")
    reference, model = [], []
    for i in range(40):
        reference.append({"instruction": f"q{i}", "output": words(5 + i % 4), "generator": "ref", "dataset": "x"})
        model.append({"instruction": f"q{i}", "output": words(3 + (i * 7) % 9, start=50), "generator": "m", "dataset": "x"})
    result = alpaca.score_alpaca_eval(model, reference[:], tmp_path / "out", annotators_config=alpaca.FAKE_JUDGE,
                                      lc_data_dir=tmp_path)
    # Not an InstructionSet and not the full 805: the GLM cannot know each instruction's difficulty.
    assert result["lc_unavailable_reason"] == "length_controlled_v1 not used: AlpacaEval indices of the instructions are unknown"
    assert result["lc_glm"] == "length_controlled_minimal"
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    import pandas as pd

    lc = alpaca.length_controlled_metrics(pd.DataFrame(annotations), list(range(100, 140)), tmp_path)
    assert lc["lc_unavailable_reason"] is None and lc["lc_glm"] == "length_controlled_v1"
    assert 0 <= lc["length_controlled_win_rate"] <= 100 and lc["lc_standard_error"] >= 0


def length_judged_annotations(n: int = 20, strength: float = 0.0, seed: int = 0) -> "pd.DataFrame":
    """Annotations drawn from the GLM's own form: the model's answer is longer in 80% of the
    pairs, and the judge prefers it with probability sigmoid(-2 tanh(delta / sd) + strength),
    delta = reference length - model length. At equal length the model's true win rate is
    sigmoid(strength); the raw win rate is inflated by the length preference."""
    import random
    import statistics

    import pandas as pd

    rng = random.Random(seed)
    ref, mine = [], []
    for i in range(n):
        r = 20 + rng.randint(0, 20)
        ref.append(words(r))
        mine.append(words(r + rng.randint(1, 30) if i < 0.8 * n else r - rng.randint(1, 15), start=100))
    delta = [len(a) - len(b) for a, b in zip(ref, mine)]
    sd = statistics.stdev(delta)
    pref = [1 + 1 / (1 + math.exp(2 * math.tanh(d / sd) - strength)) for d in delta]
    return pd.DataFrame({"instruction": [f"q{i}" for i in range(n)], "output_1": ref, "output_2": mine,
                         "generator_1": "ref", "generator_2": "m", "preference": pref})


@pytest.mark.parametrize("strength", [0.0, 1.0, -1.0])
def test_minimal_glm_recovers_the_win_rate_at_equal_length(strength):
    df = length_judged_annotations(strength=strength)
    raw = alpaca.win_rate_metrics(df)["win_rate"]
    lc = alpaca.length_controlled_metrics(df, None, glm="length_controlled_minimal")
    assert lc["lc_glm"] == "length_controlled_minimal" and lc["lc_unavailable_reason"] is None
    truth = 100 / (1 + math.exp(-strength))
    assert lc["length_controlled_win_rate"] == pytest.approx(truth, abs=1.0)
    assert raw - truth > 10  # the length preference the GLM took out
    assert 0 <= lc["lc_standard_error"] < 20


def test_length_controlled_v1_asked_for_without_its_files_is_unavailable(tmp_path):
    lc = alpaca.length_controlled_metrics(length_judged_annotations(), list(range(20)), tmp_path,
                                          glm="length_controlled_v1")
    assert lc["length_controlled_win_rate"] is None and lc["lc_glm"] is None
    assert "df_gamed.csv" in lc["lc_unavailable_reason"]
    auto = alpaca.length_controlled_metrics(length_judged_annotations(), list(range(20)), tmp_path)
    assert auto["lc_glm"] == "length_controlled_minimal"
    assert auto["lc_unavailable_reason"].startswith("length_controlled_v1 not used: FileNotFoundError")


def test_minimal_glm_on_too_few_pairs_says_why():
    lc = alpaca.length_controlled_metrics(length_judged_annotations(n=4), None)
    assert lc["length_controlled_win_rate"] is None
    assert "4 judged pairs" in lc["lc_unavailable_reason"]


def truncation_records() -> list[dict]:
    """Two single-spaced answers (word shuffles keep their length exactly), 12 and 8 words."""
    return [
        {"instruction": "long one", "output": words(12), "generator": "ref", "dataset": "planted"},
        {"instruction": "short one", "output": words(8, start=20), "generator": "ref", "dataset": "planted"},
    ]


def test_check_judge_on_planted_cases(tmp_path):
    judge = alpaca.Judge(alpaca.FAKE_JUDGE)
    result = alpaca.check_judge(judge, truncation_records(), n=2, seed=0, out_dir=tmp_path)
    by_kind = result["by_kind"]
    # Truncated: shorter, so always right, whichever order.
    assert by_kind["truncated"]["accuracy"] == 1.0 and by_kind["truncated"]["position_bias"] == 0.0
    # Shuffled: same length, so the fake judge picks the first shown: right in one order only.
    assert by_kind["shuffled"]["accuracy"] == 0.5 and by_kind["shuffled"]["position_bias"] == 0.5
    assert by_kind["shuffled"]["order_consistency"] == 0.0
    # Another instruction's answer: right against the shorter one, wrong against the longer one.
    assert by_kind["other_instruction"]["accuracy"] == 0.5 and by_kind["other_instruction"]["order_consistency"] == 1.0
    assert result["n_pairs"] == 6 and result["n_judgments"] == 12 and result["n_missing"] == 0
    assert result["accuracy"] == pytest.approx(8 / 12, abs=1e-6)
    assert result["position_bias"] == pytest.approx(8 / 12 - 0.5, abs=1e-6)
    assert result["order_consistency"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["trusted"] is False and result["judged_now"] == 12
    only_truncation = alpaca.check_judge(judge, truncation_records(), n=2, seed=0, kinds=("truncated",),
                                         out_dir=tmp_path)
    assert only_truncation["trusted"] is True and only_truncation["accuracy"] == 1.0
    assert only_truncation["judged_now"] == 0  # the four judgments are in the cache


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    return TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=4)


def test_generate_answers_with_tiny_model(tiny_engine):
    instructions = [{"instruction": "Name a colour.", "dataset": "d1"}, {"instruction": "Count to three.", "dataset": "d2"}]
    kwargs = dict(generator="tiny", system_prompt="You are helpful.", max_new_tokens=6, seed=0)
    answers = alpaca.generate_answers(tiny_engine, instructions, **kwargs)
    assert [set(a) for a in answers] == [set(alpaca.RECORD_FIELDS)] * 2
    assert [a["instruction"] for a in answers] == [i["instruction"] for i in instructions]
    assert [a["dataset"] for a in answers] == ["d1", "d2"] and {a["generator"] for a in answers} == {"tiny"}
    assert alpaca.generate_answers(tiny_engine, instructions, **kwargs) == answers  # greedy: reproducible


def test_local_logprob_judge_end_to_end(tiny_model, tmp_path, judged):
    judge = alpaca.Judge(alpaca.LOCAL_JUDGE, model=str(tiny_model))
    model, reference = planted_pairs()
    model, reference = model[:3], reference[:3]
    result = alpaca.score_alpaca_eval(model, reference, tmp_path, judge=judge)
    assert judged["humpback_engine_choice_completions"] == 6  # 3 pairs, both orders
    assert result["n"] == 3 and result["n_missing"] == 0 and 0 <= result["win_rate"] <= 100
    assert result["provenance"]["judge_model_digest"] and result["provenance"]["judge_dtype"] == "float32"
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    for a in annotations:
        assert 1.0 <= a["preference"] <= 2.0
        probs = a["preference_raw_completion"]["choice_probs"]
        assert len(probs) == 2 and 0 < sum(probs) <= 1.0 + 1e-6
    check = alpaca.check_judge(judge, truncation_records(), n=1, seed=0, kinds=("truncated",))
    assert check["n_judgments"] == 2 and check["accuracy"] in (0.0, 0.5, 1.0)
    assert 0 < check["mean_choice_mass"] <= 1.0 + 1e-6


def test_rubric_judge_end_to_end_is_symmetric(tiny_model, tmp_path, judged):
    """The pointwise judge rates each answer alone: its two orders are mirror images, so the
    averaged preference equals either order's, and the judge has no position bias at all."""
    judge = alpaca.Judge("humpback_local_rubric", model=str(tiny_model))
    assert judge.needs_engine()
    model, reference = planted_pairs()
    model, reference = model[:3], reference[:3]
    assert judge.is_symmetric() and not alpaca.Judge(alpaca.LOCAL_JUDGE).is_symmetric()
    result = alpaca.score_alpaca_eval(model, reference, tmp_path / "a", judge=judge)
    assert judged["humpback_engine_rubric_completions"] == 3 and result["orders"] == "one (symmetric judge)"
    annotations = json.loads((tmp_path / "a" / "annotations.json").read_text())
    for a in annotations:
        assert a["output_1"] in {r["output"] for r in reference}  # reference first, never shuffled
        scores = a["preference_raw_completion"]["score_probs"]
        assert len(scores) == 2 and all(len(s) == 5 for s in scores)
    # the mirror order, asked for directly, gives the mirror preference
    swapped = alpaca.score_alpaca_eval(reference, [dict(r, generator="x") for r in model], tmp_path / "b",
                                       judge=judge)
    assert swapped["win_rate"] == pytest.approx(100 - result["win_rate"], abs=1e-3)


def test_judge_dtype_loads_the_model_and_keys_its_cache(tiny_model):
    import torch

    from pipeline.digests import settings_digest

    fp32 = alpaca.Judge(alpaca.LOCAL_JUDGE, model=str(tiny_model))
    bf16 = alpaca.Judge(alpaca.LOCAL_JUDGE, model=str(tiny_model), dtype="bfloat16")
    assert {p.dtype for p in fp32.get_engine().model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.get_engine().model.parameters()} == {torch.bfloat16}
    # The identity covers the config's files, the weights and their dtype, the default's included.
    for judge in (fp32, bf16):
        what = {"config": judge.config_digest(), "model": judge.model_digest(), "dtype": judge.dtype}
        assert judge.identity() == settings_digest(what)[:12]
    assert bf16.identity() != fp32.identity()
    with pytest.raises(alpaca.JudgeError, match="dtype 'float16'"):
        alpaca.Judge(alpaca.LOCAL_JUDGE, model=str(tiny_model), dtype="float16")
