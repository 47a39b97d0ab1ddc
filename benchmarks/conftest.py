"""Benchmark session plumbing: options, the shared engine, peaks measured at the start and end of
the session, and the results JSON plus table written when the session ends.

    pytest benchmarks [--bench-profile full|quick] [--bench-out FILE] [--bench-model SPEC]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks import measure, report  # noqa: E402
from benchmarks.workloads import MODEL_SPEC, PROFILES, Profile, Round, loss_curve_difference  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("humpback benchmarks")
    group.addoption("--bench-profile", choices=sorted(PROFILES), default="full",
                    help="workload sizes: full (make bench) or quick (make bench-check)")
    group.addoption("--bench-out", default=None,
                    help="results JSON path (default: benchmarks/results/<profile>-<time>.json)")
    group.addoption("--bench-model", default=MODEL_SPEC, help="model spec, as model.base in a config")


class Recorder:
    """Collects every workload's rounds during the session and turns them into results at the end
    (MFU and normalization need the peaks, which are measured again after the last workload)."""

    def __init__(self, profile: Profile, model_spec: str):
        self.profile = profile
        self.model = {"spec": model_spec, "name": model_spec.rsplit("/", 1)[-1], "parameters": None}
        self.peaks_start = measure.measure_peaks(profile.peak_repeats)
        self.peaks: dict[str, measure.Peak] = self.peaks_start
        self.raw: dict[str, dict[str, Any]] = {}
        self.unavailable: dict[str, str] = {}
        self.scores: dict[str, list] = {}
        self.losses: dict[str, list[float]] = {}

    def add(self, name: str, *, path: str, counts: str, dtype: str, rounds: Sequence[Round],
            parameters: int | None = None, extra: dict | None = None) -> None:
        params = parameters or self.model["parameters"]
        if params is None:
            raise RuntimeError("parameter count unknown: pass parameters= or load the engine first")
        self.raw[name] = dict(path=path, counts=counts, dtype=dtype, rounds=list(rounds),
                              parameters=params, extra=extra)

    def finish_peaks(self) -> None:
        self.peaks = measure.merge_peaks(self.peaks_start, measure.measure_peaks(self.profile.peak_repeats))

    def results(self, machine: dict) -> dict[str, Any]:
        peaks = {k: p.as_dict() for k, p in self.peaks.items()}
        out: dict[str, Any] = {
            "schema": report.SCHEMA,
            "profile": self.profile.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "model": self.model,
            "peaks": peaks,
            "workloads": {name: report.workload_entry(peaks=peaks, **kw) for name, kw in self.raw.items()},
            "unavailable": self.unavailable,
        }
        if "generate" in self.scores and "logprob" in self.scores:
            out["curation_agreement"] = self._agreement()
        if "fp32" in self.losses and "bf16" in self.losses:
            out["lora_loss_difference"] = loss_curve_difference(self.losses["fp32"], self.losses["bf16"])
        out["ratios"] = report.ratios(out)
        out["targets"] = report.targets(out) if self.profile.name == "full" else []
        return out

    def _agreement(self) -> dict[str, Any]:
        gen, lp = self.scores["generate"], self.scores["logprob"]
        both = [(g, p) for g, p in zip(gen, lp) if g is not None and p is not None]
        rho = measure.spearman([g for g, _ in both], [p for _, p in both])
        return {"pairs": len(gen), "scored_by_both": len(both), "unscored_generate": sum(g is None for g in gen),
                "spearman": None if rho is None else round(rho, 4)}


@pytest.fixture(scope="session")
def profile(pytestconfig) -> Profile:
    return PROFILES[pytestconfig.getoption("--bench-profile")]


@pytest.fixture(scope="session")
def bench(pytestconfig, profile) -> Recorder:
    """The session's recorder; measures the matmul peaks before the first workload and again
    after the last one."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    recorder = Recorder(profile, pytestconfig.getoption("--bench-model"))
    pytestconfig._humpback_bench = recorder
    yield recorder
    if recorder.raw:
        recorder.finish_peaks()


@pytest.fixture(scope="session")
def model_path(pytestconfig) -> str:
    from pipeline.models import resolve_base

    return resolve_base(pytestconfig.getoption("--bench-model"))


@pytest.fixture(scope="session")
def engine(bench, model_path, profile):
    """The pipeline's engine on the benchmarked model, built by ``make_engine``."""
    from benchmarks.workloads import project_engine

    eng = project_engine(model_path, profile.batch_size)
    bench.model["parameters"] = measure.parameter_count(eng.model)
    bench.model["path"] = model_path
    return eng


@pytest.fixture(scope="session")
def reference_model(model_path):
    """The benchmarked model loaded afresh in fp32: the naive loop and the fp32-weights variant
    run on it, never on the engine's bf16 model."""
    from benchmarks.workloads import fp32_model

    return fp32_model(model_path)


MAX_ATTEMPTS = 2


def watched(fn: Callable[[], Round]) -> Round:
    """``fn()`` with the other processes' CPU share during it; run again (once) when they used
    more than ``measure.BUSY_LIMIT`` of the machine, since such a round measures the neighbours."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        before = measure.cpu_ticks()
        result = fn()
        result.busy = measure.foreign_share(before, measure.cpu_ticks())
        result.attempts = attempt
        if result.busy is None or result.busy <= measure.BUSY_LIMIT:
            break
    return result


def timed(benchmark, fn: Callable[[], Round], rounds: int, warmup: int = 1) -> list[Round]:
    """``rounds`` timed calls of ``fn`` through pytest-benchmark, after ``warmup`` untimed ones.

    The rounds' own timings (``Round.seconds``) are what the table uses; pytest-benchmark's
    table also counts a disturbed try that was run again.
    """
    out: list[Round] = []
    benchmark.pedantic(lambda: out.append(watched(fn)), rounds=rounds, warmup_rounds=warmup, iterations=1)
    # With --benchmark-disable pytest-benchmark calls fn once and skips the warm-up.
    return out[warmup:] or out


@pytest.fixture
def run_timed(benchmark):
    return lambda fn, rounds, warmup=1: timed(benchmark, fn, rounds, warmup)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table, so ours ends the output
def pytest_terminal_summary(terminalreporter, config):
    recorder: Recorder | None = getattr(config, "_humpback_bench", None)
    if recorder is None or not recorder.raw:
        return
    results = recorder.results(measure.machine_info())
    out = config.getoption("--bench-out")
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS_DIR / f"{recorder.profile.name}-{stamp}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    out.write_text(text, encoding="utf-8")
    (out.parent / f"{recorder.profile.name}-latest.json").write_text(text, encoding="utf-8")
    terminalreporter.write_sep("=", "humpback benchmark results")
    terminalreporter.write_line(report.format_table(results))
    terminalreporter.write_line(f"\nresults: {out}")
