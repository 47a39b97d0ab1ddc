import pytest

from harness.gate import Metric, Rule, compare, decide, limit_check

PROV = {"task_version": 1, "config_digest": "abc"}


def m(value, stderr=0.02, n=100, hib=True, prov=PROV, trusted=True):
    return Metric("alpaca_eval/win_rate", value, stderr, n, hib, dict(prov), trusted)


@pytest.mark.parametrize(
    "current, baseline, rule, passed, needle",
    [
        (m(0.50), m(0.48), Rule("w", 0.01, 2), True, "within threshold"),                 # improvement
        (m(0.46), m(0.50), Rule("w", 0.01, 2), True, "within threshold"),                 # drop 0.04 < 2*0.028
        (m(0.30), m(0.50), Rule("w", 0.01, 2), False, "dropped from 0.5 to 0.3"),          # beyond noise
        (m(0.49, 0.0), m(0.50, 0.0), Rule("w", 0.02, 2), True, "within"),                 # exact, under abs_tol
        (m(0.45, 0.0), m(0.50, 0.0), Rule("w", 0.02, 2), False, "threshold 0.02"),        # exact, over abs_tol
        (m(0.30, hib=False), m(0.50, hib=False), Rule("w", 0.01, 2), True, "within"),     # lower is better
        (m(0.70, hib=False), m(0.50, hib=False), Rule("w", 0.01, 2), False, "rose"),
        (m(0.50, n=50), m(0.50), Rule("w"), False, "refused: provenance differs (n 100 vs 50)"),
        (m(0.50, prov={"task_version": 2, "config_digest": "abc"}), m(0.50), Rule("w"), False, "task_version 1 vs 2"),
        (m(0.50, prov={"task_version": 1, "config_digest": "zzz"}), m(0.50), Rule("w"), False, "config_digest"),
        (m(0.90, trusted=False), m(0.50), Rule("w"), False, "this iteration's evaluator is untrusted"),
        (m(0.90), m(0.50, trusted=False), Rule("w"), False, "the baseline's evaluator is untrusted"),
        (None, m(0.5), Rule("w"), False, "missing"),
        (m(0.5), None, Rule("w"), True, "no baseline"),
    ],
)
def test_compare_table(current, baseline, rule, passed, needle):
    decision = compare(current, baseline, rule)
    assert decision.passed is passed
    assert needle in decision.reason


def test_regression_message_names_values_and_threshold():
    d = compare(m(0.30, 0.01), m(0.50, 0.01), Rule("alpaca_eval/win_rate", 0.05, 2))
    assert d.current == 0.30 and d.baseline == 0.50 and d.threshold == pytest.approx(0.05)
    assert "0.3" in d.message() and "0.5" in d.message() and "0.05" in d.message()


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
