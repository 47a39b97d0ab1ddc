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
PROC_CGROUP = Path("/proc/self/cgroup")


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> int | None:
    """CPUs the cgroup quota allows this process (rounded down, at least 1), or None when no
    quota is set. Reads cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    in the process's own cgroup (from ``membership``, ``/proc/self/cgroup``) and in each cgroup
    above it: a quota on a parent (a systemd slice, a batch job's cgroup) binds its children, so
    the tightest one counts. Inside a container with its own cgroup namespace the process's
    cgroup is the mount's root, which is read too."""
    paths = _cgroup_paths(membership)
    v2 = (root / "cgroup.controllers").is_file() or (root / "cpu.max").is_file()
    if v2:
        quotas = [_v2_quota(d) for d in _chain(root, paths.get("", "/"))]
    else:
        base = next((root / sub for sub in ("cpu", "cpu,cpuacct") if (root / sub).is_dir()), None)
        quotas = [_v1_quota(d) for d in _chain(base, paths.get("cpu", "/"))] if base else []
    limits = [max(1, math.floor(q)) for q in quotas if q is not None]
    return min(limits) if limits else None


def _cgroup_paths(membership: Path) -> dict[str, str]:
    """Controller name -> this process's cgroup path, from ``/proc/self/cgroup`` lines
    ``id:controllers:path``; the v2 hierarchy (``0::path``) is under the key ``""``."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        for controller in fields[1].split(",") if fields[1] else [""]:
            paths[controller] = fields[2]
    return paths


def _chain(base: Path, path: str) -> list[Path]:
    """``base/path`` and every directory above it up to ``base``, those that exist. A path that
    is not under this mount (a container without its own cgroup namespace sees the host's path,
    while its mount is its own cgroup) leaves just ``base``."""
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _v2_quota(cgroup: Path) -> float | None:
    """CPUs allowed by a v2 cgroup's ``cpu.max`` (``max`` or absent: None)."""
    f = cgroup / "cpu.max"
    if not f.is_file():
        return None
    fields = f.read_text().split()
    if len(fields) != 2 or fields[0] == "max" or float(fields[1]) <= 0:
        return None
    return float(fields[0]) / float(fields[1])


def _v1_quota(cgroup: Path) -> float | None:
    """CPUs allowed by a v1 cgroup's CFS quota (-1 or absent: None)."""
    q, p = cgroup / "cpu.cfs_quota_us", cgroup / "cpu.cfs_period_us"
    if not (q.is_file() and p.is_file()):
        return None
    quota, period = float(q.read_text()), float(p.read_text())
    return quota / period if quota > 0 and period > 0 else None


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


def default_device_type() -> str:
    """Where models run unless told otherwise: ``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_native(device_type: str | None = None) -> bool:
    """Whether a device type (``cpu``, ``cuda``; default :func:`default_device_type`) declares
    native bf16 arithmetic."""
    if (device_type or default_device_type()) == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
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


def bf16_choice(device_type: str | None = None) -> Bf16Choice:
    """``auto``'s decision for a device type (default :func:`default_device_type`), made once per
    process and type: a GPU is not probed, a CPU is (~0.1 s). A CPU engine on a GPU machine is
    decided by the CPU's own bf16, not the GPU's."""
    return _bf16_choice(device_type or default_device_type())


@lru_cache(maxsize=None)
def _bf16_choice(device_type: str) -> Bf16Choice:
    native = bf16_native(device_type)
    if device_type != "cpu" or not native:
        choice = decide_bf16(native)
    else:
        bf16 = statistics.median(matmul_gflops(torch.bfloat16, PROBE_SIZE, repeats=5))
        fp32 = statistics.median(matmul_gflops(torch.float32, PROBE_SIZE, repeats=5))
        choice = decide_bf16(True, round(bf16, 1), round(fp32, 1))
    log.info("bf16 on %s %s: %s", device_type, "on" if choice.use else "off", choice.reason)
    return choice


def use_bf16(setting: str, device_type: str | None = None) -> bool:
    """Resolve an ``on`` / ``off`` / ``auto`` bf16 setting for a device type (default
    :func:`default_device_type`)."""
    if setting in ("on", "off"):
        return setting == "on"
    return bf16_choice(device_type).use


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
    """Memory free on ``device`` now: the GPU's free memory (with the blocks torch's allocator
    caches unused), or the host's available memory for a CPU (Linux ``MemAvailable``; None
    elsewhere)."""
    if device.type == "cuda":
        # What the device has free, plus what torch's allocator holds cached but unused: the
        # engine's tensors are allocated from that cache first.
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
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
