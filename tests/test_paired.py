"""Paired differences (evals.paired) and per-item scores read back from an evaluation folder
(evals.item_scores)."""

import json
import math

import numpy as np
import pytest

from evals.item_scores import item_scores
from evals.paired import (PairingError, corrected_level, items_needed, mean_difference, one_sample,
                          paired_difference, unpaired)


def test_agresti_min_on_a_known_table():
    # 10 items: 4 only the current model gets right, 1 only the baseline, 5 agree.
    cur = {i: float(i < 4 or i >= 5 and i < 8) for i in range(10)}
    base = {i: float(i == 4 or i >= 5 and i < 8) for i in range(10)}
    p = paired_difference(cur, base, bounds=(0, 1))
    assert p.method == "agresti-min" and p.n == 10 and p.changed == 5 and p.estimate == pytest.approx(0.3)
    # Agresti-Min: (4 - 1) / 12 = 0.25 at the centre; variance ((4.5 + 1.5) / 12 - 0.25^2) / 12
    half = 1.959964 * math.sqrt((6 / 12 - 0.0625) / 12)
    assert p.low == pytest.approx(0.25 - half, abs=1e-5) and p.high == pytest.approx(0.25 + half, abs=1e-5)
    assert p.p_value == pytest.approx(0.375)  # McNemar exact: 4 vs 1 discordant


def test_identical_models_never_give_a_point_interval():
    same = {i: float(i % 2) for i in range(6)}
    p = paired_difference(same, same, bounds=(0, 1))
    assert p.estimate == 0 and p.low < 0 < p.high and p.mde is not None and p.changed == 0
    fractions = {i: 0.3 for i in range(6)}
    q = paired_difference(fractions, fractions, bounds=(0, 1))
    assert q.method == "pseudo-items" and q.low < 0 < q.high


def test_floating_point_noise_is_no_change():
    # the same answers rated twice: preferences equal up to float arithmetic
    base = {i: 50.0 for i in range(6)}
    noisy = {**base, 0: 50.00001, 1: 49.99999}
    p = paired_difference(noisy, base, bounds=(0, 100))
    assert p.method == "pseudo-items" and p.changed == 0 and p.high - p.low > 20


def test_continuous_items_use_student_t():
    rng = np.random.default_rng(1)
    base = {i: float(v) for i, v in enumerate(rng.uniform(0.2, 0.8, 30))}
    cur = {i: v - 0.05 + float(rng.normal(0, 0.02)) for i, v in base.items()}
    p = paired_difference(cur, base, bounds=(0, 1))
    assert p.method == "t" and p.high < 0 and p.low < p.estimate < p.high
    assert p.estimate == pytest.approx(np.mean([cur[i] - base[i] for i in base]))


def test_items_must_match():
    with pytest.raises(PairingError, match="1 only in this one, 1 only in the baseline"):
        paired_difference({1: 1.0, 2: 0.0}, {1: 1.0, 3: 0.0})
    with pytest.raises(PairingError):
        paired_difference({}, {})


def test_mde_shrinks_with_n_and_items_needed_inverts_it():
    rng = np.random.default_rng(2)
    small = mean_difference(rng.normal(0, 1, 20))
    large = mean_difference(rng.normal(0, 1, 500))
    assert large.mde < small.mde
    need = small.items_needed(small.mde / 2)
    assert 60 <= need <= 100  # about four times the items for half the effect
    assert items_needed(1.0, 0.0, 0.95, 0.8) is None
    # normal quantiles: (1.96 + 0.84)^2 / 0.5^2 = 31.4 -> 32
    assert items_needed(1.0, 0.5, 0.95, 0.8) == 32


def test_bonferroni_and_unpaired():
    assert corrected_level(0.95, 3) == pytest.approx(1 - 0.05 / 3)
    assert corrected_level(0.95, 0) == pytest.approx(0.95)
    u = unpaired(0.4, 0.5, 0.03, 0.04, 100)
    assert u.method == "unpaired" and u.estimate == pytest.approx(-0.1)
    assert u.high - u.low == pytest.approx(2 * 1.959964 * 0.05, rel=1e-4)


def test_one_sample_head_to_head_in_percent():
    lost_all = {i: 0.0 for i in range(6)}
    p = one_sample(lost_all, 50.0, bounds=(0, 100))
    assert p.estimate == -50 and p.high < -10 and p.low >= -50


@pytest.mark.parametrize("scenario", ["binary", "ties", "fractions"])
def test_interval_coverage_by_simulation(scenario):
    """The intervals hold their level (at least 0.9 at a nominal 0.95) from 6 items up: a short
    version of the simulation behind the choice of methods."""
    rng = np.random.default_rng(7)
    hits, reps = 0, 400
    for rep in range(reps):
        n = (6, 10, 30)[rep % 3]
        if scenario == "binary":
            base = (rng.random(n) < 0.6).astype(float)
            flip = rng.random(n) < 0.3
            cur = np.where(flip, (rng.random(n) < 0.4).astype(float), base)
            truth = 0.3 * 0.4 + 0.7 * 0.6 - 0.6
            p = paired_difference(dict(enumerate(cur)), dict(enumerate(base)), bounds=(0, 1))
        elif scenario == "ties":
            probs = (0.2, 0.6, 0.2) if rep % 2 else (0.7, 0.2, 0.1)
            values = rng.choice([0.0, 50.0, 100.0], n, p=probs)
            truth = 50 * probs[1] + 100 * probs[2] - 50
            p = one_sample(dict(enumerate(values)), 50.0, bounds=(0, 100))
        else:
            values = rng.beta(2, 8, n)
            truth = 0.2
            p = mean_difference(values)
        hits += p.low <= truth <= p.high
    assert hits / reps >= 0.9


def test_item_scores_from_an_evaluation_folder(tmp_path):
    ev = tmp_path / "eval"
    (ev / "alpaca").mkdir(parents=True)
    (ev / "heldout").mkdir()
    (ev / "alpaca" / "annotations.json").write_text(json.dumps([
        {"instruction": "a", "preference": 2.0}, {"instruction": "b", "preference": 1.25},
        {"instruction": "c", "preference": None}, {"instruction": "d", "preference": 0}]))
    (ev / "alpaca" / "model_outputs.jsonl").write_text(
        json.dumps({"instruction": "a", "output": "four"}) + "\n" + json.dumps({"instruction": "b", "output": ""}) + "\n")
    rows = [{"doc_id": 3, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0, "doc_hash": "h3"},
            {"doc_id": 3, "filter": "flexible-extract", "metrics": ["exact_match"], "exact_match": 0.0, "doc_hash": "h3"},
            {"doc_id": 5, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": False, "doc_hash": "h5"}]
    (ev / "heldout" / "samples_gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    win = item_scores(ev, "alpaca_eval/win_rate")
    assert win.values == {"a": 100.0, "b": 25.0, "d": 50.0} and win.left_out == 1 and win.bounds == (0, 100)
    assert item_scores(ev, "alpaca_eval/avg_length").values == {"a": 4.0, "b": 0.0}
    strict = item_scores(ev, "gsm8k/exact_match_strict")
    assert strict.values == {3: 1.0, 5: 0.0} and strict.bounds == (0, 1) and strict.keys_checked == {3: "h3", 5: "h5"}
    assert item_scores(ev, "gsm8k/exact_match_flexible").values == {3: 0.0}
    assert item_scores(ev, "alpaca_eval/lc_win_rate") is None
    assert item_scores(ev, "ifeval/prompt_level_loose_acc") is None
