import pytest

from evals.quality import (
    ContaminationIndex,
    curator_precision_recall,
    distinct_n,
    length_stats,
    load_labelled_pairs,
    near_duplicate_rate,
    pair_metrics,
)


def test_length_stats_hand_computed():
    assert length_stats(["ab", "abcd", "abcdef"]) == {"mean": 4.0, "std": 1.6}  # population std 1.633
    assert length_stats([]) == {"mean": None, "std": None}


def test_distinct_n_hand_computed():
    # unigrams: a b a c -> 3 unique of 4; bigrams: (a b) (b a) (a c) -> 3 of 3
    assert distinct_n(["a b", "a c"], 1) == 0.75
    assert distinct_n(["a b a c"], 2) == 1.0
    assert distinct_n([""], 2) is None


def test_near_duplicate_rate():
    base = "explain how the python with statement manages resources and exceptions in detail"
    texts = [base, base + " please", "write a short poem about autumn leaves falling in the park at dusk"]
    assert near_duplicate_rate(texts) == pytest.approx(1 / 3, abs=1e-4)
    assert near_duplicate_rate([]) is None


def test_pair_metrics_shape():
    m = pair_metrics([{"instruction": "Say hi", "response": "Hi there"}, {"instruction": "Count", "response": "1 2"}])
    assert m["pairs"] == 2 and m["instruction_chars"]["mean"] == 5.5 and m["response_chars"]["mean"] == 5.5


def test_contamination_planted():
    evals = {"alpaca_eval": ["What are the names of some famous actors that started their careers on Broadway?"],
             "gsm8k": ["Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning."]}
    index = ContaminationIndex(evals, n=8)
    rows = [
        {"segment_id": "a", "instruction": "Tell me: what are the names of some famous actors that started their careers"},
        {"segment_id": "b", "instruction": "What are the names of some famous painters?"},  # < 8 shared words
        {"segment_id": "c", "instruction": "JANET'S DUCKS LAY 16 EGGS PER DAY. SHE EATS..."},
    ]
    flagged = index.flag(rows)
    assert [(f["id"], f["eval_sets"]) for f in flagged] == [("a", ["alpaca_eval"]), ("c", ["gsm8k"])]
    assert index.sizes == {"alpaca_eval": 1, "gsm8k": 1}


def test_packaged_labelled_set_is_balanced():
    rows = load_labelled_pairs()
    assert len(rows) == 40 and sum(r["label"] == "good" for r in rows) == 20
    assert all(r["instruction"] and r["response"] for r in rows)


def test_curator_precision_recall_hand_computed():
    labels = ["good", "good", "bad", "bad", "good"]
    scores = [5, 3.9, 4.2, 1, None]
    # predicted good (>=4): 0 and 2 -> TP=1, FP=1, FN=2 (3.9 and the unscored good one)
    out = curator_precision_recall(labels, scores, k=4)
    assert out["precision"] == 0.5 and out["recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["unscored"] == 1 and out["predicted_good"] == 2
    assert curator_precision_recall(["bad"], [1], 4)["precision"] is None


def test_smoke_subset_is_balanced_and_in_file_order():
    from evals.quality import load_labelled_pairs

    every = load_labelled_pairs()
    assert len(every) == 40 and sorted({r["label"] for r in every}) == ["bad", "good"]
    few = load_labelled_pairs(n=8)
    assert [r["label"] for r in few].count("good") == 4 and [r["label"] for r in few].count("bad") == 4
    assert few == [r for r in every if r in few]  # a subsequence: file order kept
