import pytest

from pipeline.settings import AugmentSection
from pipeline.augment import degenerate_reason, generate_instructions
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
        return [Completion(t, True, 5) for t in self.texts]


def test_generate_instructions_rows_and_sampling_params():
    engine = ScriptedEngine(["What does the with statement do?", ""])
    segments = [{"segment_id": "a", "text": SEGMENT}, {"segment_id": "b", "text": "Other text " * 20}]
    rows = generate_instructions(engine, segments, AugmentSection(), "backward_v1", seed=7)
    assert [(r["segment_id"], r["rejected"]) for r in rows] == [("a", None), ("b", "empty")]
    assert rows[0]["response"] == SEGMENT
    chats, params = engine.calls[0]
    assert chats[0][-1] == {"role": "user", "content": SEGMENT}
    assert (params.temperature, params.top_p, params.seed) == (0.7, 0.9, 7)
