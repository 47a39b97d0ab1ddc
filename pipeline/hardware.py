"""What the machine offers, decided once per process: how many threads to compute with, and
whether bf16 is worth using.

Threads: torch's default is one thread per core it can see, and it does not read a container's
CPU quota. A process limited to 4 CPUs by a cgroup on a 64-core host would start 64 threads and
spend its quota switching between them, so the default is lowered to what the process may use
(affinity mask and cgroup quota).

bf16: the hardware must declare native bf16 (AVX512-BF16 or AMX on x86, the ``bf16`` feature on
Arm, a bf16-capable GPU), and on a CPU a bf16 matmul must also measure faster than fp32 here,
by at least :data:`BF16_MIN_SPEEDUP`: a virtual machine can pass the flag through while the
library falls back to a slow path, and then fp32 is the better choice.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.25
"""A CPU's bf16 matmul must be at least this much faster than fp32 for ``auto`` to choose bf16."""
PROBE_SIZE = 1024
"""Square matmul size of the bf16 probe (a few milliseconds each on a 2-core CPU)."""
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup quota allows this process (rounded down, at least 1), or None when no
    quota is set. Reads cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    quota = period = None
    v2 = root / "cpu.max"
    if v2.is_file():
        fields = v2.read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = float(fields[0]), float(fields[1])
    else:
        for sub in ("cpu", "cpu,cpuacct"):
            q, p = root / sub / "cpu.cfs_quota_us", root / sub / "cpu.cfs_period_us"
            if q.is_file() and p.is_file():
                quota, period = float(q.read_text()), float(p.read_text())
                if quota <= 0:  # -1: unlimited
                    quota = None
                break
    if quota is None or not period:
        return None
    return max(1, math.floor(quota / period))


def cpu_budget(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity mask, lowered to the cgroup quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(root)
    except (OSError, ValueError):
        limit = None
    return min(cpus, limit) if limit else cpus


def configure_threads(requested: int | None, root: Path = CGROUP_ROOT) -> int:
    """Set torch's intra-op threads: ``requested`` exactly when given, else torch's own choice
    lowered to :func:`cpu_budget` (never raised). Returns the thread count in effect."""
    if requested:
        torch.set_num_threads(requested)
    else:
        budget = cpu_budget(root)
        if torch.get_num_threads() > budget:
            log.info("torch would use %d threads; this process may use %d CPUs, so it uses %d",
                     torch.get_num_threads(), budget, budget)
            torch.set_num_threads(budget)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------


def cpuinfo_declares_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists native bf16: ``avx512_bf16`` or ``amx_bf16`` among an
    x86 CPU's ``flags``, or ``bf16`` among an Arm CPU's ``Features``."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        words = set(value.split())
        if key.strip() == "flags" and words & {"avx512_bf16", "amx_bf16"}:
            return True
        if key.strip() == "Features" and "bf16" in words:
            return True
    return False


def bf16_native() -> bool:
    """Whether the default device declares native bf16 arithmetic."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            return cpuinfo_declares_bf16(fh.read())
    except OSError:
        return False


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int, warmup: int = 2) -> list[float]:
    """GFLOP/s of ``repeats`` square CPU matmuls of ``size`` in ``dtype``, one sample per matmul."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    flops = 2.0 * size**3
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        samples.append(flops / (time.perf_counter() - start) / 1e9)
    return samples


@dataclass(frozen=True)
class Bf16Choice:
    """What ``auto`` resolves to, and why (recorded in the run's ``env.json``)."""

    use: bool
    reason: str
    bf16_gflops: float | None = None
    fp32_gflops: float | None = None

    def as_dict(self) -> dict:
        return {"use": self.use, "reason": self.reason, "bf16_gflops": self.bf16_gflops,
                "fp32_gflops": self.fp32_gflops, "min_speedup": BF16_MIN_SPEEDUP}


def decide_bf16(native: bool, bf16_gflops: float | None = None, fp32_gflops: float | None = None) -> Bf16Choice:
    """The rule: native bf16, and (where measured) a speedup of at least ``BF16_MIN_SPEEDUP``."""
    if not native:
        return Bf16Choice(False, "the hardware declares no native bf16")
    if bf16_gflops is None or fp32_gflops is None:
        return Bf16Choice(True, "native bf16 (not measured)")
    speedup = bf16_gflops / fp32_gflops
    figures = f"bf16 matmul {bf16_gflops:.0f} vs fp32 {fp32_gflops:.0f} GFLOP/s ({speedup:.2f}x)"
    if speedup < BF16_MIN_SPEEDUP:
        return Bf16Choice(False, f"{figures}, under the {BF16_MIN_SPEEDUP}x needed", bf16_gflops, fp32_gflops)
    return Bf16Choice(True, figures, bf16_gflops, fp32_gflops)


@lru_cache(maxsize=1)
def bf16_choice() -> Bf16Choice:
    """``auto``'s decision for this process (a GPU is not probed; a CPU is, once: ~0.1 s)."""
    native = bf16_native()
    if torch.cuda.is_available() or not native:
        choice = decide_bf16(native)
    else:
        bf16 = statistics.median(matmul_gflops(torch.bfloat16, PROBE_SIZE, repeats=5))
        fp32 = statistics.median(matmul_gflops(torch.float32, PROBE_SIZE, repeats=5))
        choice = decide_bf16(True, round(bf16, 1), round(fp32, 1))
    log.info("bf16 %s: %s", "on" if choice.use else "off", choice.reason)
    return choice


def use_bf16(setting: str) -> bool:
    """Resolve an ``on`` / ``off`` / ``auto`` bf16 setting."""
    if setting in ("on", "off"):
        return setting == "on"
    return bf16_choice().use


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

KV_CACHE_SHARE = 0.5
"""``kv_cache_gib: auto`` gives one batch's KV cache this share of the memory free when the
engine is built (weights already loaded); the rest is left for prefill activations, logits and
whatever else the process holds."""
KV_CACHE_FALLBACK_GIB = 2.0
"""``auto``'s budget where free memory cannot be read."""


def meminfo_available(text: str) -> int | None:
    """Bytes of ``MemAvailable`` in ``/proc/meminfo`` text (None when absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            return int(fields[1]) * 1024 if len(fields) >= 2 and fields[1].isdigit() else None
    return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: the GPU's free memory, or the host's available memory for a
    CPU (Linux ``MemAvailable``; None elsewhere)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            return meminfo_available(fh.read())
    except OSError:
        return None


def kv_cache_budget_gib(setting: float | str | None, device: torch.device) -> float | None:
    """Resolve ``engine.kv_cache_gib``: a number as given, None (no limit) as given, ``auto`` as
    :data:`KV_CACHE_SHARE` of the memory free on ``device`` now."""
    if setting != "auto":
        return setting
    free = free_memory_bytes(device)
    if free is None:
        log.info("KV-cache budget: free memory on %s unknown, using %.1f GiB", device, KV_CACHE_FALLBACK_GIB)
        return KV_CACHE_FALLBACK_GIB
    budget = round(KV_CACHE_SHARE * free / 2**30, 2)
    log.info("KV-cache budget per batch: %.2f GiB (%.0f%% of %.2f GiB free on %s)",
             budget, 100 * KV_CACHE_SHARE, free / 2**30, device)
    return max(budget, 0.01)
