"""Regression check: a results file against the committed baseline (``baselines/cpu.json``).

A workload regresses when its machine-normalized throughput (throughput / measured matmul peak)
falls more than the baseline's tolerance below the baseline's value. Faster is never a failure.

    python -m benchmarks.check [--results FILE] [--baseline FILE] [--tolerance X]
    python -m benchmarks.check --write-baseline RUN.json [RUN.json ...] [--baseline FILE]

Exit status: 0 no regression, 1 a workload regressed (or is missing), 2 unusable input, 3
inconclusive: only workloads that other processes disturbed fell below the baseline (rerun on a
quiet machine), or the machine differs from the baseline's in native bf16 or thread count.

Writing a baseline takes several runs of the same profile: the baseline value is the median of
the runs' medians, and each workload's tolerance comes from how far those runs spread (see
:func:`tolerance_for`). Standard library only, so the check and its tests start fast.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_BASELINE = HERE / "baselines" / "cpu.json"
DEFAULT_RESULTS = HERE / "results" / "check.json"

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3

SPREAD_FACTOR = 2.0
MIN_TOLERANCE = 0.25
MAX_TOLERANCE = 0.40
TOLERANCE_RULE = (
    f"tolerance = clamp({SPREAD_FACTOR:g} x spread, {MIN_TOLERANCE:g}, {MAX_TOLERANCE:g}), where spread = "
    "(max - min) / median of the workload's normalized throughput over the baseline runs (each run "
    "itself the median of its rounds). Twice the observed range, because a handful of runs "
    "underestimates the range on a shared machine; never below 25%, because on the 2-core reference "
    "VM single quick runs fell up to 13% below the median of five even for workloads whose runs "
    "happened to agree, and a CI run on a fresh clone fell 10.5% below on a workload whose tolerance "
    "was 16% (a check that runs in CI must not flake); never above 40%, so that a halved throughput "
    "always fails. worst_drop is "
    "how far the slowest baseline run fell below the median: every tolerance must stay above it."
)


class CheckError(ValueError):
    """The results or baseline file cannot be used; the message says why."""


@dataclass(frozen=True)
class Verdict:
    """One workload's comparison."""

    workload: str
    baseline: float | None
    current: float | None
    tolerance: float
    unit: str = ""
    reason: str = ""
    busy: float | None = None
    """Other processes' share of the CPU while the workload ran (from the results file)."""
    disturbed: bool = False

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.current is None or not self.baseline:
            return None
        return self.current / self.baseline

    @property
    def ok(self) -> bool:
        if self.baseline is None:
            return True  # a new workload: nothing to regress from
        if self.current is None:
            return False
        return self.current >= self.baseline * (1.0 - self.tolerance)

    @property
    def inconclusive(self) -> bool:
        """Below the baseline, but measured while other processes used the CPU: on a 2-core
        machine that alone can halve throughput, so it says nothing about the code."""
        return not self.ok and self.disturbed and self.current is not None


def load_json(path: str | Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), dict):
        raise CheckError(f"{what} file {path} has no 'workloads' mapping")
    return data


def compare(results: dict[str, Any], baseline: dict[str, Any], tolerance: float | None = None) -> list[Verdict]:
    """A verdict per workload in the baseline (missing ones fail) and per new workload (pass).

    Args:
        results: a results file's content (``benchmarks/results/*.json``).
        baseline: the baseline's content.
        tolerance: overrides every workload's stored tolerance when given.
    """
    if results.get("profile") != baseline.get("profile"):
        raise CheckError(f"results are from profile {results.get('profile')!r} but the baseline is for "
                         f"{baseline.get('profile')!r}; run the same profile")
    verdicts = []
    for name, base in baseline["workloads"].items():
        tol = tolerance if tolerance is not None else float(base.get("tolerance", MIN_TOLERANCE))
        cur = results["workloads"].get(name)
        if cur is None:
            verdicts.append(Verdict(name, base["normalized"], None, tol, base.get("normalized_unit", ""),
                                    "not measured in this run"))
        else:
            verdicts.append(Verdict(name, base["normalized"], cur["normalized"], tol, cur.get("normalized_unit", ""),
                                    busy=cur.get("busy"), disturbed=bool(cur.get("disturbed"))))
    for name, cur in results["workloads"].items():
        if name not in baseline["workloads"]:
            verdicts.append(Verdict(name, None, cur["normalized"], 0.0, cur.get("normalized_unit", ""),
                                    "no baseline yet"))
    return verdicts


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    """One line per workload with both numbers, their ratio and the allowed drop."""
    lines = [f"{'workload':<17} {'baseline':>10} {'current':>10} {'ratio':>7} {'allowed':>8}  verdict"]
    for v in verdicts:
        base = "n/a" if v.baseline is None else f"{v.baseline:#.4g}"
        cur = "n/a" if v.current is None else f"{v.current:#.4g}"
        ratio = "n/a" if v.ratio is None else f"{v.ratio:.3f}"
        allowed = f">= {1 - v.tolerance:.2f}" if v.baseline is not None else ""
        if v.ok:
            verdict = "ok" + (f" ({v.reason})" if v.reason else "")
        elif v.inconclusive:
            verdict = (f"INCONCLUSIVE: {(1 - v.ratio) * 100:.0f}% below baseline, but other processes used "
                       f"{v.busy * 100:.0f}% of the CPU meanwhile")
        else:
            verdict = "REGRESSION: " + (v.reason or f"{(1 - v.ratio) * 100:.0f}% below baseline, "
                                                    f"more than the {v.tolerance * 100:.0f}% tolerance")
        lines.append(f"{v.workload:<17} {base:>10} {cur:>10} {ratio:>7} {allowed:>8}  {verdict}  {v.unit}")
    return "\n".join(lines)


COMPARABLE_KEYS = ("bf16_supported", "threads")
"""Machine facts that must match the baseline's for a drop to count as a regression: without
native bf16 the engine runs another code path (fp32), and another thread count scales the
per-step overheads differently from the matmul peak that normalizes throughput."""


def incomparable(results: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """The facts in :data:`COMPARABLE_KEYS` on which this machine differs from the baseline's."""
    a, b = results.get("machine", {}), baseline.get("machine", {})
    return [f"{k}: baseline {b.get(k)!r}, now {a.get(k)!r}" for k in COMPARABLE_KEYS if a.get(k) != b.get(k)]


def machine_note(results: dict[str, Any], baseline: dict[str, Any]) -> str | None:
    """A warning when the baseline was measured on another kind of machine."""
    a, b = results.get("machine", {}), baseline.get("machine", {})
    keys = [k for k in ("cpu", "threads", "torch") if a.get(k) != b.get(k)]
    if not keys:
        return None
    diff = ", ".join(f"{k}: baseline {b.get(k)!r}, now {a.get(k)!r}" for k in keys)
    return f"note: different machine or software ({diff}); normalized numbers transfer only roughly"


def tolerance_for(values: Sequence[float]) -> tuple[float, float]:
    """(tolerance, spread) for one workload's per-run normalized throughputs."""
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med else 0.0
    return min(MAX_TOLERANCE, max(MIN_TOLERANCE, SPREAD_FACTOR * spread)), spread


def build_baseline(runs: Sequence[dict[str, Any]], sources: Sequence[str] = ()) -> dict[str, Any]:
    """A baseline from several runs of one profile: median value and spread-based tolerance."""
    if not runs:
        raise CheckError("no runs to build a baseline from")
    profiles = {r.get("profile") for r in runs}
    if len(profiles) != 1:
        raise CheckError(f"runs mix profiles {sorted(map(str, profiles))}")
    disturbed = [f"{n} (run {i + 1})" for i, r in enumerate(runs) for n, w in r["workloads"].items()
                 if w.get("disturbed")]
    if disturbed:
        raise CheckError(f"other processes used the CPU during {', '.join(disturbed)}; a baseline must come "
                         "from a quiet machine")
    names = [n for n in runs[0]["workloads"] if all(n in r["workloads"] for r in runs)]
    workloads = {}
    for name in names:
        values = [r["workloads"][name]["normalized"] for r in runs]
        raw = [r["workloads"][name]["throughput"] for r in runs]
        tol, spread = tolerance_for(values)
        first = runs[0]["workloads"][name]
        med = statistics.median(values)
        workloads[name] = {
            "normalized": float(f"{med:.6g}"),
            "normalized_unit": first.get("normalized_unit", ""),
            "tolerance": round(tol, 3),
            "spread": round(spread, 4),
            "worst_drop": round(1 - min(values) / med, 4) if med else 0.0,
            "runs": [float(f"{v:.6g}") for v in values],
            "throughput": round(statistics.median(raw), 3),
            "unit": first.get("unit", ""),
            "path": first.get("path", ""),
        }
    peaks = {k: round(statistics.median(r["peaks"][k]["gflops"] for r in runs), 2) for k in ("bf16", "fp32")}
    return {
        "profile": runs[0]["profile"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": runs[0].get("machine", {}),
        # The model's local path differs per machine; its spec and size identify it.
        "model": {k: v for k, v in runs[0].get("model", {}).items() if k != "path"},
        "peaks_gflops": peaks,
        "peak_runs": {k: [r["peaks"][k]["gflops"] for r in runs] for k in ("bf16", "fp32")},
        "runs": len(runs),
        "sources": list(sources),
        "tolerance_rule": TOLERANCE_RULE,
        "workloads": workloads,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="results JSON of the run to check")
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="baseline JSON (read, or written)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed relative drop for every workload, instead of the baseline's own")
    p.add_argument("--write-baseline", nargs="+", metavar="RUN", default=None,
                   help="write the baseline from these results files instead of checking")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.write_baseline:
            runs = [load_json(p, "results") for p in args.write_baseline]
            baseline = build_baseline(runs, [Path(p).name for p in args.write_baseline])
            Path(args.baseline).parent.mkdir(parents=True, exist_ok=True)
            Path(args.baseline).write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.baseline} from {len(runs)} runs ({baseline['profile']} profile)")
            for name, w in baseline["workloads"].items():
                print(f"  {name:<17} {w['normalized']:#.4g} {w['normalized_unit']:<13} spread "
                      f"{w['spread'] * 100:4.1f}%  tolerance {w['tolerance'] * 100:.0f}%")
            return EXIT_OK
        results = load_json(args.results, "results")
        baseline = load_json(args.baseline, "baseline")
        verdicts = compare(results, baseline, args.tolerance)
    except CheckError as exc:
        print(f"benchmarks.check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"normalized throughput (throughput / measured peak GFLOP/s), {args.results} vs {args.baseline}:")
    print(format_verdicts(verdicts))
    note = machine_note(results, baseline)
    if note:
        print(note)
    failed = [v.workload for v in verdicts if not v.ok and not v.inconclusive]
    unsure = [v.workload for v in verdicts if v.inconclusive]
    differs = incomparable(results, baseline)
    if failed and differs:
        print(f"INCONCLUSIVE: {', '.join(failed)} below baseline, but this machine is not comparable with the "
              f"baseline's ({'; '.join(differs)}); rewrite the baseline on this kind of machine "
              "(make bench-baseline) to check it here")
        return EXIT_INCONCLUSIVE
    if failed:
        print(f"FAILED: {', '.join(failed)} below baseline by more than the tolerance")
        return EXIT_REGRESSION
    if unsure:
        print(f"INCONCLUSIVE: {', '.join(unsure)} below baseline while other processes were using the CPU; "
              "rerun when the machine is quiet")
        return EXIT_INCONCLUSIVE
    print("ok: no workload below its baseline by more than its tolerance")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
