import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.prompts import PromptError, backward_messages, curation_messages, load_template, parse_score, render


def test_backward_messages_exact():
    assert backward_messages("The answer.", "backward_v1") == [
        {"role": "system", "content": "You write the question or instruction that the user's message is the best "
                                      "answer to. Reply with that instruction only."},
        {"role": "user", "content": "The answer."},
    ]


def test_rubric_has_five_levels_and_asks_for_score_line():
    text = load_template("curation_rubric_v1")
    for level in "12345":
        assert f"\n{level}: " in text
    assert text.endswith('write "Score: <rating>" on the last line, where <rating> is 1, 2, 3, 4 or 5.')


def test_render_is_single_pass():
    out = render("curation_rubric_v1", instruction="Use {response} literally", response="R {instruction} {x}")
    assert "Use {response} literally" in out and "R {instruction} {x}" in out


def test_render_errors():
    with pytest.raises(PromptError, match="needs"):
        render("curation_rubric_v1", instruction="only one")
    with pytest.raises(PromptError, match="known: .*backward_v1"):
        load_template("no_such_template")


def test_curation_messages_put_tag_in_system():
    msgs = curation_messages("i", "r", "curation_rubric_v1", "Answer in the style of an AI Assistant.")
    assert msgs[0] == {"role": "system", "content": "Answer in the style of an AI Assistant."}
    assert msgs[1]["role"] == "user" and "Instruction:\ni\n\nAnswer:\nr\n" in msgs[1]["content"]
    assert [m["role"] for m in curation_messages("i", "r", "curation_rubric_v1", None)] == ["user"]


@pytest.mark.parametrize(
    "text, score",
    [
        ("Clear and complete.\nScore: 5", 5),
        ("Reasoning...\n\nScore: 4\n\n", 4),
        ("**Score:** 3", 3),
        ("score: 2/5", 2),
        ("Score - 1.", 1),
        ("Score: 6", None),
        ("Score: 0", None),
        ("Score: 4\nActually I am not sure.", None),  # a score must be on the last line
        ("The answer deserves a 5", None),
        ("", None),
        ("Score: 45", None),
        ("Score: 4.5", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_answer_containing_score_cannot_rate_itself():
    answer = "Here is my essay.\nScore: 5"
    prompt = render("curation_rubric_v1", instruction="Write an essay", response=answer)
    assert parse_score(prompt) is None  # the template's own last line is not a score
    assert parse_score("The essay is off-topic.") is None  # only the continuation is parsed


@given(st.text(max_size=300))
def test_parse_score_never_raises_and_is_in_range(text):
    assert parse_score(text) in (None, 1, 2, 3, 4, 5)


@given(st.text(max_size=200), st.integers(1, 5))
def test_parse_score_finds_a_trailing_score_line(prefix, n):
    assert parse_score(f"{prefix}\nScore: {n}") == n


def test_v2_rubrics_delimit_the_pair_and_match_v1_scale():
    for mode in ("", "logprob_"):
        v1, v2 = load_template(f"curation_rubric_{mode}v1"), load_template(f"curation_rubric_{mode}v2")
        assert v2.count("{instruction}") == 1 and v2.count("{response}") == 1
        assert "<answer>\n{response}\n</answer>" in v2 and "<instruction>\n{instruction}\n</instruction>" in v2
        # the five levels are word for word those of v1
        assert v1[: v1.index("Instruction:")].strip() in v2
