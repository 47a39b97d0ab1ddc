"""Machine-level measurements and the arithmetic behind the table: matmul peaks, FLOPs, MFU,
machine-normalized throughput and rank agreement.

Formulas (also in ``benchmarks/README.md``):

* FLOPs of a workload = ``2 * P * T``, where ``P`` is the model's parameter count (tied
  embeddings counted once) and ``T`` the tokens it processed: prompt tokens plus generated
  tokens for generation and curation, every non-padding token of every batch for training.
* MFU = (FLOPs / seconds) / measured peak FLOP/s of the workload's compute dtype.
* normalized throughput = throughput / measured peak GFLOP/s (e.g. tokens per GFLOP), so that
  runs on different machines can be compared.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pipeline.hardware import matmul_gflops

PEAK_SIZE = 2048


@dataclass
class Peak:
    """A measured matmul peak for one dtype."""

    dtype: str
    gflops: float
    """Median over the samples, in GFLOP/s."""
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "gflops": round(self.gflops, 2), "size": PEAK_SIZE,
                "samples": [round(s, 2) for s in self.samples]}


def measure_peaks(repeats: int = 10) -> dict[str, Peak]:
    """The bf16 and fp32 matmul peaks (median of ``repeats``)."""
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        samples = matmul_gflops(dtype, PEAK_SIZE, repeats=repeats)
        peaks[name] = Peak(name, statistics.median(samples), samples)
    return peaks


def merge_peaks(first: dict[str, Peak], second: dict[str, Peak]) -> dict[str, Peak]:
    """Peaks measured at the start and at the end of a session: the higher of the two medians.

    Contention from other processes only ever lowers a matmul rate, and on a shared machine it
    comes and goes (one session here measured half the bf16 peak at its start and the full peak
    at its end), so the better of two medians is the closer estimate of what the machine can do.
    Both sets of samples are kept.
    """
    out = {}
    for name in first:
        best = max(first[name].gflops, second[name].gflops)
        out[name] = Peak(name, best, first[name].samples + second[name].samples)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters counted once each (``parameters()`` already deduplicates tied weights)."""
    return sum(p.numel() for p in model.parameters())


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the measured peak."""
    return flops / seconds / (peak_gflops * 1e9)


def normalized(throughput: float, peak_gflops: float) -> float:
    """Throughput per GFLOP/s of measured peak (units: items per GFLOP)."""
    return throughput / peak_gflops


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: the relative width of a set of repeats."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; ties get the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when undefined (fewer than
    three pairs, or one side constant)."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5


# ---------------------------------------------------------------------------------------------
# Contention: how much of the machine other processes used while we measured
# ---------------------------------------------------------------------------------------------

BUSY_LIMIT = 0.10
"""A round during which other processes (or the hypervisor, as steal time) used more than this
share of the machine's CPU time is disturbed: on 2 cores, a second CPU-bound process makes
torch's OpenMP threads wait on each other and throughput collapses by far more than its share."""


@dataclass(frozen=True)
class CpuTicks:
    machine_busy: int
    """Busy ticks of all CPUs together (user, nice, system, irq, softirq, steal)."""
    own: int
    """This process's and its live descendants' user + system ticks, all threads."""
    at: float


def _process_ticks(pid: int | str) -> int:
    """user + system ticks of one process, all threads (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # The command name may contain spaces: fields count from after its closing ")".
            rest = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15 of the whole line)


def _descendants(pid: int | str) -> list[str]:
    """Live descendants of a process, from /proc/<pid>/task/<tid>/children."""
    out: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                children = fh.read().split()
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def cpu_ticks() -> CpuTicks | None:
    """A snapshot from /proc, or None where there is no /proc (then contention is unknown). The
    process's own ticks include those of its live child processes: an engine that computes in a
    child (vLLM) is this benchmark's work, not a neighbour's."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        own = _process_ticks("self")
        if not os.path.exists("/proc/self/stat"):
            return None
    except (OSError, ValueError, IndexError):
        return None
    own += sum(_process_ticks(pid) for pid in _descendants(os.getpid()))
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return CpuTicks(user + nice + system + irq + softirq + steal, own, time.perf_counter())


def foreign_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Share of the machine's CPU time (all cores) used by anything but this process between two
    snapshots; None when unknown."""
    if before is None or after is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    capacity = (after.at - before.at) * hz * (os.cpu_count() or 1)
    if capacity <= 0:
        return None
    foreign = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(0.0, foreign / capacity)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on; the check prints it when machines differ."""
    import transformers

    from pipeline.hardware import bf16_choice, bf16_native

    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "bf16_supported": bf16_native("cpu"),
        "bf16_auto": bf16_choice("cpu").as_dict(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
