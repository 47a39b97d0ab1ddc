import json
import math

import pytest

from pipeline.settings import AugmentSection
from pipeline.augment import (candidate, degenerate_reason, generate_instructions, instruction_token_lengths,
                              length_summary, quantile, salvage, token_budget)
from pipeline.engine import Completion
from pipeline.prompts import render

SEGMENT = ("The with statement is used to wrap the execution of a block with methods defined by a context "
           "manager. This allows common try, except, finally usage patterns to be encapsulated for reuse.")
PROMPT = render("backward_v1")


@pytest.mark.parametrize(
    "instruction, finished, reason",
    [
        ("Explain what Python's with statement does and why it is useful.", True, None),
        ("", True, "empty"),
        ("   ", True, "empty"),
        ("Explain", True, "too_short"),
        ("Explain the with statement and", False, "unfinished"),
        ("The with statement is used to wrap the execution of a block with methods", True, "echo"),
        ("You write the question or instruction that the user's message is the best answer to.", True, "prompt_leak"),
        ("<|im_start|>assistant\nExplain with", True, "prompt_leak"),
        ("user: what is with?", True, "prompt_leak"),
        ("python python python python python python python python python", True, "repetitive"),
    ],
)
def test_degenerate_reasons(instruction, finished, reason):
    assert degenerate_reason(instruction, SEGMENT, finished, AugmentSection(), PROMPT) == reason


def test_unfinished_can_be_kept():
    assert degenerate_reason("Explain the with statement and", SEGMENT, False, AugmentSection(drop_unfinished=False)) is None


class ScriptedEngine:
    """Returns fixed completions and records what it was asked."""

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def generate(self, chats, params):
        self.calls.append((chats, params))
        return [t if isinstance(t, Completion) else Completion(t, True, 5) for t in self.texts]


def test_generate_instructions_rows_and_sampling_params():
    engine = ScriptedEngine(["What does the with statement do?", ""])
    segments = [{"segment_id": "a", "text": SEGMENT}, {"segment_id": "b", "text": "Other text " * 20}]
    rows = generate_instructions(engine, segments, AugmentSection(max_new_tokens=96), "backward_v1", seed=7)
    assert [(r["segment_id"], r["rejected"]) for r in rows] == [("a", None), ("b", "empty")]
    assert rows[0]["response"] == SEGMENT
    assert rows[0]["new_tokens"] == 6  # 5 tokens and the end of turn, as seed lengths are counted
    assert candidate(rows[0]) == {"segment_id": "a", "instruction": "What does the with statement do?",
                                  "response": SEGMENT}
    chats, params = engine.calls[0]
    assert chats[0][-1] == {"role": "user", "content": SEGMENT}
    assert (params.temperature, params.top_p, params.seed, params.max_new_tokens) == (0.7, 0.9, 7, 96)


def test_generate_instructions_needs_a_resolved_budget():
    with pytest.raises(ValueError, match="resolved"):
        generate_instructions(ScriptedEngine(["x"]), [{"segment_id": "a", "text": SEGMENT}], AugmentSection(),
                              "backward_v1", seed=0)


# --------------------------------------------------------------------------- the budget


def test_quantile_is_nearest_rank():
    values = list(range(1, 21))  # 1..20
    assert quantile(values, 0.95) == 19 and quantile(values, 1.0) == 20 and quantile(values, 0.5) == 10
    assert quantile([7], 0.95) == 7
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_instruction_lengths_count_the_end_of_turn():
    assert instruction_token_lengths(lambda text: len(text.split()), ["a b c", "d"]) == [4, 2]


def test_auto_budget_is_a_seed_quantile_times_the_margin():
    lengths = [10] * 18 + [30, 90]  # p95 of 20 values is the 19th smallest: 30
    budget, info = token_budget(lengths, AugmentSection(budget_quantile=0.95, budget_margin=1.5))
    assert budget == 45 == info["max_new_tokens"]
    assert info["source"] == "auto" and info["quantile_tokens"] == 30 and info["margin"] == 1.5
    assert info["seed_over_budget"] == 1  # the 90-token outlier is beyond the quantile, and said so
    assert info["seed_instruction_tokens"] == length_summary(lengths)
    assert info["seed_instruction_tokens"]["max"] == 90 and info["seed_instruction_tokens"]["n"] == 20
    assert token_budget([7, 9, 11], AugmentSection(budget_quantile=1.0, budget_margin=1.3))[0] == math.ceil(11 * 1.3)


def test_fixed_budget_is_kept_and_counts_the_seed_it_would_cut():
    budget, info = token_budget([10, 20, 70, 80], AugmentSection(max_new_tokens=64))
    assert budget == 64 and info["source"] == "config" and info["seed_over_budget"] == 2


def test_auto_budget_without_seed_is_an_error():
    with pytest.raises(ValueError, match="no seed instructions"):
        token_budget([], AugmentSection())


def test_budget_settings_are_validated():
    from pydantic import ValidationError

    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": "lots"}, {"budget_margin": 0.5}, {"budget_quantile": 0}):
        with pytest.raises(ValidationError):
            AugmentSection(**bad)


# --------------------------------------------------------------------------- unfinished instructions

PARAGRAPH = "Write a clear introduction to the supplement industry. Use a conversational tone."


@pytest.mark.parametrize(
    "text, expected",
    [
        (PARAGRAPH + "\n\nProvide a detailed explanation of the situation, including the", PARAGRAPH),
        ("Is it safe?\n\nThe answer", "Is it safe?"),
        ("Summarise the quote “we need hope.”\n\n“Cancer is", "Summarise the quote “we need hope.”"),
        ("Rewrite the following sentence:\n\nThe cat sat on the", None),  # not a sentence: it needs what follows
        ("Write a Python function that takes\na list and returns the longest run of equal items that is", None),
        ("What a story. What a story about what happened. What a story about", None),  # no paragraph break
        ("", None),
    ],
)
def test_salvage_takes_only_a_closed_first_paragraph(text, expected):
    assert salvage(text) == expected


def unfinished(text):
    return Completion(text, False, 64)


def test_unfinished_salvaged_only_when_asked_and_clean():
    echo = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
    texts = [unfinished(PARAGRAPH + "\n\nProvide a detailed"), unfinished(echo + "\n\nThis allows"),
             unfinished("Write about the with statement and what it is used for and"), "Explain with."]
    segments = [{"segment_id": str(i), "text": SEGMENT} for i in range(4)]
    off = generate_instructions(ScriptedEngine(texts), segments, AugmentSection(max_new_tokens=64), "backward_v1", 0)
    assert [r["rejected"] for r in off] == ["unfinished", "unfinished", "unfinished", None]
    assert not any("salvaged_from" in r for r in off) and off[0]["new_tokens"] == 64
    on = generate_instructions(ScriptedEngine(texts), segments,
                               AugmentSection(max_new_tokens=64, salvage_unfinished=True), "backward_v1", 0)
    assert [r["rejected"] for r in on] == [None, "unfinished", "unfinished", None]  # an echoing head stays out
    assert on[0]["instruction"] == PARAGRAPH and on[0]["salvaged_from"] == PARAGRAPH + "\n\nProvide a detailed"
    assert "salvaged_from" not in candidate(on[0]) and "new_tokens" not in candidate(on[0])


# --------------------------------------------------------------------------- in the loop, on the tiny model


@pytest.mark.slow
def test_low_yield_stops_the_loop_right_after_augmentation(tiny_model, tmp_path, monkeypatch, capsys):
    """Half the segments rejected, against a maximum of 0.4: ``humpback iterate`` stops with the
    gate's exit status after augmentation, before M0 is trained, naming the reasons and counts;
    the budget came from the seed's instructions in the backward model's tokens."""
    from harness.cli import EXIT_GATE, main
    from harness.gate import decide_augmentation
    from harness.config import load_config
    from harness.rundir import DONE, MANIFEST
    from pipeline import augment
    from pipeline.io import read_jsonl
    from pipeline.models import load_tokenizer
    from test_end_to_end import write_config

    calls = iter(range(1000))
    monkeypatch.setattr(augment, "degenerate_reason", lambda *a, **k: "unfinished" if next(calls) % 2 == 0 else None)
    path = write_config(tmp_path, tiny_model, eval={"enabled": False}, gate={"max_augment_reject_rate": 0.4},
                        augment={"max_new_tokens": "auto", "budget_margin": 1.0})
    root = tmp_path / "run"
    assert main(["iterate", "--config", str(path), "--run-dir", str(root)]) == EXIT_GATE
    err = capsys.readouterr().err
    assert "iteration 1 failed its gate" in err and "augment/reject_rate" in err
    assert "0.50 of 12 segments got no usable instruction, above the maximum 0.4 (reasons: unfinished 6)" in err
    assert (root / "augment" / DONE).exists() and not (root / "iter_00" / "finetune").exists()
    gate = json.loads((root / "iter_01" / "gate.json").read_text())
    assert not gate["passed"] and gate["evaluated"] is False
    assert [d["check"] for d in gate["decisions"]] == ["augment/reject_rate"]
    assert main(["gate", str(root)]) == EXIT_GATE  # re-decided from disk: still failing

    stats = json.loads((root / "augment" / MANIFEST).read_text())["stats"]
    rejects = read_jsonl(root / "augment" / "rejects.jsonl")
    assert stats["rejected"] == {"unfinished": 6} and len(rejects) == 6 and stats["generated"] == 6
    tokenizer = load_tokenizer(str(tiny_model))
    lengths = [len(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"]) + 1
               for r in read_jsonl(root / "seed" / "data.jsonl")]
    budget = stats["budget"]
    assert budget["source"] == "auto" and budget["max_new_tokens"] == quantile(lengths, 0.95)
    assert budget["seed_instruction_tokens"]["n"] == 12 and budget["seed_instruction_tokens"]["max"] == max(lengths)
    assert all(0 < r["new_tokens"] <= budget["max_new_tokens"] for r in rejects)
    cfg = load_config(path)
    assert not decide_augmentation(stats, cfg).passed
    assert decide_augmentation(stats, cfg.model_copy(update={"gate": cfg.gate.model_copy(
        update={"max_augment_reject_rate": 0.5})})).passed  # 6 of 12 is not above 0.5
