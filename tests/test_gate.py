import json

import pytest
import yaml

from harness.gate import Metric, Rule, compare, decide, decide_iteration, limit_check

PROV = {"task_version": 1, "config_digest": "abc"}


def m(value, stderr=0.02, n=100, hib=True, prov=PROV, trusted=True):
    return Metric("alpaca_eval/win_rate", value, stderr, n, hib, dict(prov), trusted)


@pytest.mark.parametrize(
    "current, baseline, rule, outcome, needle",
    [
        (m(0.50), m(0.48), Rule("w", 0.01), "inconclusive", "straddles"),             # +0.02 +- 0.055
        (m(0.60), m(0.50), Rule("w", 0.01), "pass", "excludes a drop"),                # +0.10 +- 0.055
        (m(0.30), m(0.50), Rule("w", 0.01), "regression", "lies wholly beyond"),       # -0.20 +- 0.055
        (m(0.49, 0.0), m(0.50, 0.0), Rule("w", 0.02), "pass", "excludes"),             # exact, under abs_tol
        (m(0.45, 0.0), m(0.50, 0.0), Rule("w", 0.02), "regression", "tolerance of 0.02"),  # exact, over abs_tol
        (m(0.30, hib=False), m(0.50, hib=False), Rule("w", 0.01), "pass", "excludes"),  # lower is better
        (m(0.70, hib=False), m(0.50, hib=False), Rule("w", 0.01), "regression", "better"),
        (m(0.50, n=50), m(0.50), Rule("w"), "refused", "refused: provenance differs (n 100 vs 50)"),
        (m(0.50, prov={"task_version": 2, "config_digest": "abc"}), m(0.50), Rule("w"), "refused", "task_version 1 vs 2"),
        (m(0.50, prov={"task_version": 1, "config_digest": "zzz"}), m(0.50), Rule("w"), "refused", "config_digest"),
        (m(0.90, trusted=False), m(0.50), Rule("w"), "refused", "this iteration's evaluator is untrusted"),
        (m(0.90), m(0.50, trusted=False), Rule("w"), "refused", "the baseline's evaluator is untrusted"),
        (None, m(0.5), Rule("w"), "missing", "missing"),
        (m(0.5), None, Rule("w"), "no baseline", "no baseline"),
    ],
)
def test_compare_table(current, baseline, rule, outcome, needle):
    decision = compare(current, baseline, rule)
    assert decision.outcome == outcome and needle in decision.reason
    assert decision.passed is (outcome in ("pass", "inconclusive", "no baseline"))  # inconclusive goes on by default
    assert compare(current, baseline, rule, on_inconclusive="stop").passed is (outcome in ("pass", "no baseline"))


def test_regression_message_names_values_interval_and_what_it_could_see():
    d = compare(m(0.30, 0.01), m(0.50, 0.01), Rule("alpaca_eval/win_rate", 0.05))
    assert d.current == 0.30 and d.baseline == 0.50 and d.threshold == pytest.approx(0.05)
    assert d.estimate == pytest.approx(-0.2) and d.low < -0.2 < d.high < -0.05
    assert d.signal.startswith("unpaired") and d.mde == pytest.approx(2.8016 * 0.01 * 2 ** 0.5, rel=1e-3)
    assert d.blind is False and "0.3" in d.message() and "0.5" in d.message() and "MDE 0.0396" in d.message()
    wide = compare(m(0.30, 0.2), m(0.50, 0.2), Rule("alpaca_eval/win_rate", 0.05))
    assert wide.blind is True and wide.items_needed > 100 and "BLIND" in wide.reason


@pytest.mark.parametrize(
    "value, lo, hi, passed",
    [(10, 5, None, True), (3, 5, None, False), (0.1, None, 0.2, True), (0.5, None, 0.2, False), (None, 1, None, False)],
)
def test_limit_checks(value, lo, hi, passed):
    assert limit_check("data/selected", value, minimum=lo, maximum=hi).passed is passed


def test_decide_fails_if_any_fails():
    ok = limit_check("a", 1, minimum=0)
    bad = limit_check("b", 1, maximum=0)
    assert decide([ok]).passed and not decide([ok, bad]).passed
    assert decide([ok, bad]).failures() == [bad]


# --------------------------------------------------------------------------- from a run directory

WIN = "alpaca_eval/win_rate"
GATE_CONFIG = {"run": {"name": "g"}, "iterate": {"iterations": 1},
               "gate": {"metrics": [{"metric": WIN, "abs_tol": 0.01}], "min_selected": 2, "baseline": "best"}}


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


def _committed(path, stats) -> None:
    _write(path / "manifest.json", {"stage": path.name, "stats": stats})
    (path / ".done").write_text("key")


def gated_run(tmp_path, win_now: float):
    """M0 and iteration 1 on disk, as the loop leaves them before iteration 1's gate."""
    from harness.config import dump_config, load_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "gate.yaml"
    source.write_text(yaml.safe_dump(GATE_CONFIG))
    cfg = load_config(source)
    run = tmp_path / "run"
    _write(run / "config.yaml", dump_config(cfg))
    prov = {"task_version": 1, "config_digest": "abc"}
    for t, win in ((0, 0.5), (1, win_now)):
        _committed(run / f"iter_{t:02d}" / "eval", {})
        _write(run / f"iter_{t:02d}" / "eval" / "summary.json", {"metrics": {
            WIN: {"value": win, "stderr": 0.01, "n": 100, "higher_is_better": True, "trusted": True,
                  "provenance": prov},
            "other/metric": {"value": None}}})
    _committed(run / "iter_01" / "curate", {"unscored_rate": 0.1})
    _committed(run / "iter_01" / "select", {"selected": 5, "contaminated": 0})
    return cfg, run


def test_decide_iteration_reads_data_and_evaluation_from_the_view(tmp_path):
    from harness.runview import read_run

    cfg, run = gated_run(tmp_path, win_now=0.3)
    data_only = decide_iteration(read_run(run), cfg, 1, evaluated=False)
    assert data_only.passed and data_only.evaluated is False
    assert [d.check for d in data_only.decisions] == ["data/selected", "curation/unscored_rate",
                                                      "data/contamination_rate"]
    full = decide_iteration(read_run(run), cfg, 1, evaluated=True)
    assert not full.passed and [d.check for d in full.failures()] == [WIN]
    failure = full.failures()[0]
    assert failure.outcome == "regression" and failure.signal.startswith("unpaired") and failure.baseline_iteration == 0
    assert "0.3 vs 0.5" in failure.reason and "[baseline iter_00]" in failure.reason


def test_gate_command_writes_each_gate_and_exits_on_the_first_failure(tmp_path, capsys):
    from harness.cli import EXIT_GATE, main

    _, run = gated_run(tmp_path, win_now=0.3)
    assert main(["gate", str(run)]) == EXIT_GATE
    assert "iter_01: FAIL" in capsys.readouterr().out
    written = json.loads((run / "iter_01" / "gate.json").read_text())
    assert written["passed"] is False and written["evaluated"] is True and written["baseline"] == "best"
    assert list(written) == ["passed", "baseline", "decisions", "evaluated"]

    _, run = gated_run(tmp_path / "ok", win_now=0.5)
    assert main(["gate", str(run)]) == 0
    assert json.loads((run / "iter_01" / "gate.json").read_text())["passed"] is True


def test_gate_command_names_a_malformed_file(tmp_path, capsys):
    from harness.cli import EXIT_DATA, main

    _, run = gated_run(tmp_path, win_now=0.5)
    bad = run / "iter_00" / "eval" / "summary.json"
    bad.write_text('{"metrics": ', encoding="utf-8")
    assert main(["gate", str(run)]) == EXIT_DATA
    assert f"error: {bad}: not valid JSON" in capsys.readouterr().err
    assert not (run / "iter_01" / "gate.json").exists()  # no decision on a half-read directory


def test_augment_yield_gate_names_the_reasons():
    from harness.gate import augment_yield_check

    news = {"segments": 48, "generated": 25, "rejected": {"unfinished": 21, "echo": 2}}  # 23 of 48 lost
    assert augment_yield_check(news, 0.5).passed  # 0.479 is under 0.5
    d = augment_yield_check(news, 0.4)
    assert not d.passed and d.current == pytest.approx(23 / 48) and d.threshold == 0.4
    assert d.reason.startswith("0.48 of 48 segments got no usable instruction, above the maximum 0.4")
    assert "reasons: unfinished 21, echo 2" in d.reason and "augment/rejects.jsonl" in d.reason
    assert not augment_yield_check({}, 0.5).passed  # missing stats never pass silently


def _select_stage(root, t, rows, stats=None):
    """A committed select stage of iteration ``t`` holding ``rows``, as the run view reads it."""
    from harness.rundir import DONE
    from harness.runview import _stage

    folder = root / f"iter_{t:02d}" / "select"
    folder.mkdir(parents=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "manifest.json").write_text(json.dumps({"stage": f"iter_{t:02d}/select",
                                                            "stats": stats or {"selected": len(rows)}}))
    (folder / DONE).touch()
    return _stage(root, folder / "manifest.json")


def test_selection_change_check_tells_a_fixed_point_from_a_change(tmp_path):
    from harness.gate import CHANGED, FIXED_POINT, selection_change_check

    rows = [{"segment_id": f"s{i}", "instruction": f"q{i}", "response": f"a{i}", "score": 4.0} for i in range(4)]
    rescored = [{**r, "score": 2.5} for r in rows]  # scores are not trained on
    one, same = _select_stage(tmp_path / "a", 1, rows), _select_stage(tmp_path / "a", 2, rescored)
    fixed = selection_change_check(tmp_path / "a", 2, same, one)
    assert fixed.passed and fixed.outcome == FIXED_POINT and "4 of its 4 pairs" in fixed.reason
    assert decide([fixed]).fixed_point() is fixed

    other = _select_stage(tmp_path / "b", 2, rows[1:] + [{**rows[0], "segment_id": "s9"}])
    first = _select_stage(tmp_path / "b", 1, rows)
    changed = selection_change_check(tmp_path / "b", 2, other, first)
    assert changed.passed and changed.outcome == CHANGED and decide([changed]).fixed_point() is None
    assert "3 of its 4 pairs were selected by iter_01 too, 1 of iter_01's 4 dropped" in changed.reason
    # the same pairs in another order, or one response edited, train another model: not a fixed point
    for i, variant in enumerate([rows[::-1], rows[:3] + [{**rows[3], "response": "other"}]]):
        root = tmp_path / f"c{i}"
        current, previous = _select_stage(root, 2, variant), _select_stage(root, 1, rows)
        assert selection_change_check(root, 2, current, previous).outcome == CHANGED
    # iteration 1 follows M0, which trained on the seed alone: nothing to repeat
    assert selection_change_check(tmp_path / "a", 1, one, None) is None


def test_curation_filter_check_says_when_the_threshold_left_out_nothing(tmp_path):
    from harness.gate import FILTERED, UNFILTERED, curation_filter_check

    rows = [{"segment_id": f"s{i}", "instruction": f"q{i}", "response": f"a{i}", "score": s}
            for i, s in enumerate([2.0, 2.4, 3.1])]
    base = {"candidates": 5, "selected": 3, "unscored": 1, "flagged": 1, "capped": 0, "k": 1.906}
    # k below every score: the unscored and flagged pairs went, but no scored pair was left out
    kept_all = _select_stage(tmp_path / "a", 1, rows, {**base, "below_k": 0})
    d = curation_filter_check(tmp_path / "a", 1, kept_all, "continue")
    assert d.passed and d.outcome == UNFILTERED and decide([d]).unfiltered() is d
    assert "k=1.906 is at or below every scored candidate's score (lowest kept 2)" in d.reason
    assert "kept all 3 scored of 5 candidates: its selection is the augmented data, unfiltered" in d.reason
    assert not curation_filter_check(tmp_path / "a", 1, kept_all, "stop").passed  # gate.on_unfiltered: stop

    some = _select_stage(tmp_path / "b", 1, rows, {**base, "k": 2.2, "selected": 2, "below_k": 1})
    d = curation_filter_check(tmp_path / "b", 1, some, "stop")
    assert d.passed and d.outcome == FILTERED and d.reason == "1 of 3 scored candidates left out: 1 below k=2.2"
    assert decide([d]).unfiltered() is None
    capped = _select_stage(tmp_path / "c", 1, rows, {**base, "below_k": 0, "capped": 2})
    d = curation_filter_check(tmp_path / "c", 1, capped, "stop")  # select.max_pairs filters by score too
    assert d.outcome == FILTERED and d.current == 2
    assert d.reason == "2 of 3 scored candidates left out: 0 below k=1.906, 2 beyond select.max_pairs (the lowest scored above k)"
    # select.k: all is uncurated on purpose, and an empty or missing selection has nothing to say
    uncurated = _select_stage(tmp_path / "d", 1, rows, {**base, "k": "all", "below_k": 0})
    assert curation_filter_check(tmp_path / "d", 1, uncurated, "stop") is None
    empty = _select_stage(tmp_path / "e", 1, [], {**base, "candidates": 0, "below_k": 0})
    assert curation_filter_check(tmp_path / "e", 1, empty, "stop") is None
    assert curation_filter_check(tmp_path / "f", 1, None, "stop") is None
    # stats that do not say how many pairs fell below k give no verdict rather than a guess
    unknown = _select_stage(tmp_path / "g", 1, rows, base)
    assert curation_filter_check(tmp_path / "g", 1, unknown, "stop") is None
