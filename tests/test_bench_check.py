"""The benchmark regression check: its comparison, its baseline building and its CLI's exit status,
on pure data and on real rounds of a deliberately slowed engine (tiny model, no SmolLM2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

# benchmarks/ is not an installed package (it is not shipped), so import it from the checkout.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import check, report  # noqa: E402
from benchmarks.measure import spearman  # noqa: E402
from benchmarks.workloads import Round  # noqa: E402

# Fixed peaks: the comparison logic is under test here, not the machine.
PEAKS = {"bf16": {"gflops": 100.0, "samples": [100.0], "size": 2048},
         "fp32": {"gflops": 50.0, "samples": [50.0], "size": 2048}}
PARAMS = 1_000_000


def results_from(rounds_by_name: dict[str, list[Round]], peaks=PEAKS, profile="quick") -> dict:
    """A results file's content, built by the same code the benchmark session uses."""
    workloads = {
        name: report.workload_entry(path="test", counts="new_tokens", dtype="bf16", rounds=rounds,
                                    parameters=PARAMS, peaks=peaks)
        for name, rounds in rounds_by_name.items()
    }
    return {"profile": profile, "machine": {"cpu": "test"}, "peaks": peaks, "workloads": workloads}


def steady(tokens_per_second: float, n: int = 3) -> list[Round]:
    return [Round(seconds=1.0, items=4, prompt_tokens=100, new_tokens=int(tokens_per_second)) for _ in range(n)]


BASE = results_from({"answer": steady(400), "augment": steady(800)})


def baseline_from(*runs: dict) -> dict:
    return check.build_baseline(list(runs))


def test_identical_results_pass():
    verdicts = check.compare(BASE, baseline_from(BASE, BASE, BASE))
    assert [v.ok for v in verdicts] == [True, True]
    assert all(v.ratio == pytest.approx(1.0) for v in verdicts)


def test_half_throughput_fails_and_names_both_numbers():
    slow = results_from({"answer": steady(200), "augment": steady(800)})
    verdicts = {v.workload: v for v in check.compare(slow, baseline_from(BASE))}
    assert not verdicts["answer"].ok and verdicts["augment"].ok
    text = check.format_verdicts(list(verdicts.values()))
    line = next(x for x in text.splitlines() if x.startswith("answer"))
    assert "4.000" in line and "2.000" in line and "REGRESSION" in line  # 400/100 and 200/100 per GFLOP


def test_drop_within_tolerance_passes_and_faster_always_passes():
    baseline = baseline_from(BASE)  # one run: zero spread, so the minimum tolerance
    allowed = 400 * (1 - check.MIN_TOLERANCE)
    assert check.compare(results_from({"answer": steady(allowed + 10), "augment": steady(800)}), baseline)[0].ok
    assert not check.compare(results_from({"answer": steady(allowed - 10), "augment": steady(800)}), baseline)[0].ok
    assert all(v.ok for v in check.compare(results_from({"answer": steady(4000), "augment": steady(8000)}), baseline))


def test_normalization_forgives_a_slower_machine():
    """Half the peak and half the throughput: the same normalized throughput, so no regression."""
    half_peaks = {k: {**v, "gflops": v["gflops"] / 2} for k, v in PEAKS.items()}
    slower_machine = results_from({"answer": steady(200), "augment": steady(400)}, peaks=half_peaks)
    assert all(v.ok for v in check.compare(slower_machine, baseline_from(BASE)))


def test_missing_workload_fails_new_workload_passes():
    only_answer = results_from({"answer": steady(400), "lora": steady(50)})
    verdicts = {v.workload: v for v in check.compare(only_answer, baseline_from(BASE))}
    assert not verdicts["augment"].ok and verdicts["augment"].reason == "not measured in this run"
    assert verdicts["lora"].ok and verdicts["lora"].baseline is None


def busy(rounds: list[Round], share: float) -> list[Round]:
    for r in rounds:
        r.busy = share
    return rounds


def test_a_drop_measured_on_a_busy_machine_is_inconclusive_not_a_regression(tmp_path):
    """Other processes took 45% of the CPU: the drop says nothing about the code (exit 3), but a
    drop on a quiet machine next to it is still a regression (exit 1)."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(baseline_from(BASE)))
    disturbed = results_from({"answer": busy(steady(150), 0.45), "augment": busy(steady(800), 0.02)})
    assert disturbed["workloads"]["answer"]["disturbed"] and not disturbed["workloads"]["augment"]["disturbed"]
    path = tmp_path / "busy.json"
    path.write_text(json.dumps(disturbed))
    out = _cli("--results", str(path), "--baseline", str(baseline))
    assert out.returncode == check.EXIT_INCONCLUSIVE and "INCONCLUSIVE" in out.stdout and "45%" in out.stdout

    both = results_from({"answer": busy(steady(150), 0.45), "augment": busy(steady(300), 0.0)})
    path.write_text(json.dumps(both))
    assert _cli("--results", str(path), "--baseline", str(baseline)).returncode == check.EXIT_REGRESSION

    with pytest.raises(check.CheckError, match="quiet machine"):
        baseline_from(BASE, disturbed)


def test_foreign_cpu_share_arithmetic(monkeypatch):
    from benchmarks import measure

    monkeypatch.setattr(measure.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(measure.os, "cpu_count", lambda: 2)
    before = measure.CpuTicks(machine_busy=1000, own=400, at=10.0)
    after = measure.CpuTicks(machine_busy=1400, own=700, at=12.0)  # 2 s x 2 CPUs = 400 ticks
    assert measure.foreign_share(before, after) == pytest.approx(100 / 400)
    assert measure.foreign_share(None, after) is None
    assert measure.BUSY_LIMIT == report.BUSY_LIMIT  # report.py keeps a torch-free copy


def test_profile_mismatch_is_an_error():
    with pytest.raises(check.CheckError, match="profile"):
        check.compare(results_from({"answer": steady(400)}, profile="full"), baseline_from(BASE))


def test_tolerance_follows_the_spread_within_bounds():
    runs = [results_from({"answer": steady(v)}) for v in (400, 380, 420)]  # spread 10%
    w = baseline_from(*runs)["workloads"]["answer"]
    assert w["spread"] == pytest.approx(0.1, abs=1e-3)
    assert w["tolerance"] == pytest.approx(max(check.MIN_TOLERANCE, check.SPREAD_FACTOR * 0.1))
    assert w["normalized"] == pytest.approx(4.0)
    wild = baseline_from(*[results_from({"answer": steady(v)}) for v in (400, 100, 900)])
    assert wild["workloads"]["answer"]["tolerance"] == check.MAX_TOLERANCE < 0.5  # halving still fails


def test_committed_baseline_is_usable():
    baseline = check.load_json(check.DEFAULT_BASELINE, "baseline")
    assert baseline["profile"] == "quick" and baseline["tolerance_rule"]
    assert baseline["workloads"]
    for name, w in baseline["workloads"].items():
        assert w["normalized"] > 0, name
        assert check.MIN_TOLERANCE <= w["tolerance"] <= check.MAX_TOLERANCE < 0.5, name
        assert len(w["runs"]) == baseline["runs"] >= 3, name


def test_benchmarks_stay_out_of_make_test():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9487, abs=1e-4)  # ties: average ranks
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_status(tmp_path):
    runs = []
    for i, v in enumerate((400, 390, 410)):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(results_from({"answer": steady(v), "augment": steady(2 * v)})))
        runs.append(str(path))
    baseline = tmp_path / "baseline.json"
    written = _cli("--write-baseline", *runs, "--baseline", str(baseline))
    assert written.returncode == 0, written.stderr
    assert json.loads(baseline.read_text())["runs"] == 3

    same = _cli("--results", runs[0], "--baseline", str(baseline))
    assert same.returncode == check.EXIT_OK, same.stdout + same.stderr

    half = tmp_path / "half.json"
    half.write_text(json.dumps(results_from({"answer": steady(200), "augment": steady(800)})))
    slow = _cli("--results", str(half), "--baseline", str(baseline))
    assert slow.returncode == check.EXIT_REGRESSION
    assert "REGRESSION" in slow.stdout and "4.000" in slow.stdout and "2.000" in slow.stdout

    # The same halving on a machine without native bf16 (another code path): not comparable.
    other = results_from({"answer": steady(200), "augment": steady(800)})
    other["machine"] = {"cpu": "test", "bf16_supported": False}
    other_file = tmp_path / "other-machine.json"
    other_file.write_text(json.dumps(other))
    unsure = _cli("--results", str(other_file), "--baseline", str(baseline))
    assert unsure.returncode == check.EXIT_INCONCLUSIVE, unsure.stdout
    assert "not comparable" in unsure.stdout and "bf16_supported" in unsure.stdout

    missing = _cli("--results", str(tmp_path / "nope.json"), "--baseline", str(baseline))
    assert missing.returncode == check.EXIT_USAGE and "not found" in missing.stderr


class SlowEngine:
    """Any engine, made ``factor`` times slower: every ``generate`` sleeps for (factor - 1) times
    what the real call took, so the slowdown holds however fast or loaded the machine is."""

    def __init__(self, inner, factor: float):
        self.inner, self.factor = inner, factor

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, chats, params):
        start = time.perf_counter()
        out = self.inner.generate(chats, params)
        time.sleep((self.factor - 1) * (time.perf_counter() - start))
        return out


def test_slowed_engine_fails_the_check(tiny_model, tmp_path):
    """Real rounds of the benchmark's generation workload on the tiny model: a 3x slower engine
    fails against a baseline from the normal engine; the normal engine passes against a baseline
    from the slow one. Rounds alternate between the two so machine load hits both alike; they run
    on one thread, since a busy neighbour stalls a multi-threaded step at its barriers by many
    times its length, and five of each keep one stalled round from moving a median."""
    import torch

    from benchmarks.workloads import engine_generate_round
    from pipeline.engine import SamplingParams, TransformersEngine
    from pipeline.models import load_model, load_tokenizer

    engine = TransformersEngine(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=2)
    slow = SlowEngine(engine, factor=3.0)
    chats = [[{"role": "user", "content": "Why does ice float on water?"}],
             [{"role": "user", "content": "Explain what causes ocean tides."}]]
    params = SamplingParams(max_new_tokens=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine_generate_round(engine, chats, params)  # warm-up
        fast_rounds, slow_rounds = [], []
        for _ in range(5):
            fast_rounds.append(engine_generate_round(engine, chats, params))
            slow_rounds.append(engine_generate_round(slow, chats, params))
    finally:
        torch.set_num_threads(threads)
    assert all(r.new_tokens == 12 for r in fast_rounds + slow_rounds)  # fixed work: forced tokens

    fast_results, slow_results = results_from({"answer": fast_rounds}), results_from({"answer": slow_rounds})
    fast_file, slow_file = tmp_path / "fast.json", tmp_path / "slow.json"
    fast_file.write_text(json.dumps(fast_results))
    slow_file.write_text(json.dumps(slow_results))

    fast_baseline = tmp_path / "fast-baseline.json"
    fast_baseline.write_text(json.dumps(baseline_from(fast_results)))
    failed = _cli("--results", str(slow_file), "--baseline", str(fast_baseline))
    assert failed.returncode == check.EXIT_REGRESSION, failed.stdout

    slow_baseline = tmp_path / "slow-baseline.json"
    slow_baseline.write_text(json.dumps(baseline_from(slow_results)))
    passed = _cli("--results", str(fast_file), "--baseline", str(slow_baseline))
    assert passed.returncode == check.EXIT_OK, passed.stdout


def test_naive_reference_runs_in_fp32_only(tiny_model):
    """The naive loop is the issue's fp32 reference: handed the engine's bf16 model it refuses
    instead of timing a bf16 loop under the fp32 label."""
    import torch

    from benchmarks.workloads import fp32_model, naive_generate_round
    from pipeline.engine import SamplingParams
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    chats = [[{"role": "user", "content": "Why does ice float on water?"}]]
    params = SamplingParams(max_new_tokens=3)
    model = fp32_model(str(tiny_model))
    done = naive_generate_round(model, tok, chats, params)
    assert done.new_tokens == 3
    with pytest.raises(ValueError, match="fp32"):
        naive_generate_round(model.to(torch.bfloat16), tok, chats, params)


def test_a_child_process_work_counts_as_own():
    # vLLM computes in child processes: their CPU time is the benchmark's own, not a neighbour's.
    import subprocess
    import sys
    import time

    from benchmarks import measure

    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.5)
        before = measure.cpu_ticks()
        time.sleep(1.5)
        after = measure.cpu_ticks()
    finally:
        child.wait()
    if before is None:
        pytest.skip("no /proc")
    hz = measure.os.sysconf("SC_CLK_TCK")
    assert after.own - before.own >= 0.5 * 1.5 * hz  # the child's busy loop, at least half a core
