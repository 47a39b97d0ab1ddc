"""The run directory: truth on disk, step-level caching and crash-safe stage commits.

Each stage writes into ``<name>.partial/`` and is committed by renaming that folder to
``<name>/`` after ``manifest.json`` and the ``.done`` marker are written. A stage is skipped only
when ``<name>/.done`` exists and the manifest's cache key (stage version, settings digest, input
digests) equals the key asked for, so a killed process can never leave something that is later
taken as finished. A partial folder whose key matches is handed back to the stage, which may
reuse the chunks it already committed there.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from harness.config import settings_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DONE = ".done"
KEY = ".key"
SCRATCH = "_scratch"
LOGS = "logs"  # recorded in the manifest but left out of the output digest (timings differ per run)
TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "datasketch", "numpy")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path, exclude: tuple[str, ...] = (MANIFEST, DONE, KEY)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below ``root`` (relative POSIX paths, sorted)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or rel.split("/")[0] == SCRATCH:
            continue
        out[rel] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    return out


def combine_digests(files: dict[str, dict[str, Any]]) -> str:
    return settings_digest({k: v["sha256"] for k, v in files.items() if not k.startswith(LOGS + "/")})


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class StageResult:
    """A committed stage: its folder and manifest."""

    name: str
    path: Path
    manifest: dict[str, Any]
    skipped: bool = False

    @property
    def digest(self) -> str:
        return self.manifest["output_digest"]

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.get("stats", {})


@dataclass
class StageContext:
    """What a stage function gets: where to write, and a scratch folder that is not an output."""

    name: str
    work: Path
    settings: dict[str, Any]
    inputs: dict[str, StageResult]
    key: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scratch(self) -> Path:
        path = self.work / SCRATCH
        path.mkdir(exist_ok=True)
        return path


StageFn = Callable[[StageContext], dict[str, Any]]


def reset_peak_rss() -> str:
    """Start a new peak-memory window for this process; returns what the next
    :func:`peak_rss_mib` will cover: ``"stage"`` (Linux resets the high-water mark through
    ``/proc/self/clear_refs``) or ``"process"`` (elsewhere: the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return "stage"
    except OSError:
        return "process"


def _proc_status_mib(field: str) -> float | None:
    """A kB field of ``/proc/self/status`` in MiB (None where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    """Resident memory of this process now (MiB; None where ``/proc`` is missing)."""
    return _proc_status_mib("VmRSS")


RELEASE_AFTER_MIB = 256
"""A stage whose peak memory rose this far above its start (it loaded a model, say) is followed
by a full garbage collection before its heap is trimmed."""


def trim_heap() -> None:
    """Ask glibc to return free heap pages to the operating system. It keeps freed blocks below
    its mmap threshold, which grows to 32 MiB after large tensors are freed, so without this a
    process's resident memory only ever grows by what it once held at a time. A no-op where the
    C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others
        return None


def release_memory() -> None:
    """Hand memory the last step freed back to the operating system: collect reference cycles
    (a model caught in one stays alive until the collector runs), then :func:`trim_heap`, and
    return the GPU blocks torch's allocator keeps cached (:func:`release_gpu_cache`)."""
    gc.collect()
    trim_heap()
    release_gpu_cache(collect=False)


def _cuda():
    """``torch.cuda`` where torch is already imported and has started CUDA in this process, else
    None: the run directory never imports torch or starts a GPU context itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def release_gpu_cache(collect: bool = True) -> None:
    """Give the GPU memory that torch's caching allocator holds but no tensor uses back to the
    device, so that the next stage (another model, lm-eval, the Trainer) and the KV budget's
    free-memory reading see it. ``collect``: run the garbage collector first (tensors held by
    reference cycles are only freed then)."""
    cuda = _cuda()
    if cuda is None:
        return
    if collect:
        gc.collect()
    cuda.empty_cache()


def reset_gpu_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)


def gpu_peak_mib() -> float | None:
    """Most GPU memory torch's allocator reserved on any one GPU since :func:`reset_gpu_peak`, in
    MiB (every GPU is read: ``engine.device`` may be ``cuda:N``, not the current device); None
    where CUDA has not been used."""
    cuda = _cuda()
    if cuda is None:
        return None
    return round(max(cuda.max_memory_reserved(d) for d in range(cuda.device_count())) / 2**20, 1)


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process (MiB) since the last :func:`reset_peak_rss`."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024, 1)
    except (ImportError, OSError):
        return None


class RunDir:
    """One run's directory; ``stage`` runs or skips a stage by its cache key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, StageResult] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def cache_key(self, name: str, version: str, settings: dict, inputs: dict[str, StageResult]) -> str:
        return settings_digest(
            {
                "stage": name,
                "version": version,
                "settings": settings,
                "inputs": {k: v.digest for k, v in sorted(inputs.items())},
            }
        )

    def load(self, name: str) -> StageResult | None:
        """The committed result of a stage, or None if it is not finished."""
        final = self.path(name)
        if not (final / DONE).exists():
            return None
        manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
        return StageResult(name, final, manifest, skipped=True)

    def stage(
        self,
        name: str,
        fn: StageFn,
        *,
        version: str,
        settings: dict[str, Any],
        inputs: dict[str, StageResult] | None = None,
    ) -> StageResult:
        inputs = inputs or {}
        key = self.cache_key(name, version, settings, inputs)
        final = self.path(name)
        work = final.with_name(final.name + ".partial")

        done = self.load(name)
        if done is not None and done.manifest.get("cache_key") == key:
            log.info("stage %s: cached (key %s), skipping", name, key)
            self.results[name] = done
            return done
        if (work / DONE).exists() and _read(work / KEY) == key:
            log.info("stage %s: finished before a crash, committing", name)
            return self._commit(name, work, final)

        if work.exists() and _read(work / KEY) != key:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / KEY).write_text(key)

        log.info("stage %s: running (key %s)", name, key)
        started = time.time()
        trim_heap()
        rss_start = current_rss_mib()
        peak_scope = reset_peak_rss()
        reset_gpu_peak()
        ctx = StageContext(name=name, work=work, settings=settings, inputs=inputs, key=key)
        stats = fn(ctx)
        finished = time.time()
        peak = peak_rss_mib()
        gpu_peak = gpu_peak_mib()
        if peak is None or rss_start is None or peak - rss_start > RELEASE_AFTER_MIB:
            release_memory()
        else:
            trim_heap()  # a full garbage collection takes 0.3 s in a process with the ML libraries loaded
            release_gpu_cache()
        rss_end = current_rss_mib()
        log.info("stage %s: done in %.1f s; memory peak %s MiB, %s MiB at start, %s MiB after%s",
                 name, finished - started, peak, rss_start, rss_end,
                 f"; GPU peak {gpu_peak} MiB" if gpu_peak is not None else "")

        shutil.rmtree(work / SCRATCH, ignore_errors=True)
        files = tree_digests(work)
        manifest = {
            "stage": name,
            "version": version,
            "cache_key": key,
            "settings": settings,
            "settings_digest": settings_digest(settings),
            "inputs": {k: {"stage": v.name, "digest": v.digest} for k, v in inputs.items()},
            "outputs": files,
            "output_digest": combine_digests(files),
            "stats": stats,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(finished - started, 3),
            "peak_rss_mib": peak,
            "peak_rss_scope": peak_scope,
            "rss_start_mib": rss_start,
            "rss_end_mib": rss_end,
            "gpu_peak_mib": gpu_peak,
            "packages": package_versions(),
        }
        write_json_atomic(work / MANIFEST, manifest)
        (work / DONE).write_text(key)
        return self._commit(name, work, final)

    def _commit(self, name: str, work: Path, final: Path) -> StageResult:
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        result = StageResult(name, final, json.loads((final / MANIFEST).read_text(encoding="utf-8")))
        self.results[name] = result
        return result

    def write_env(self) -> None:
        """Record where and with what this run ran (git commit, packages, machine)."""
        env = {
            "python": sys.version,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "git_commit": _git_commit(),
            "packages": package_versions(),
            "argv": sys.argv,
        }
        try:
            import torch

            from pipeline import hardware

            env["torch_threads"] = torch.get_num_threads()
            env["cpu_budget"] = hardware.cpu_budget()
            env["bf16_auto"] = {"device": hardware.default_device_type(), **hardware.bf16_choice().as_dict()}
            env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - env capture must never fail a run
            pass
        write_json_atomic(self.root / "env.json", env)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None
