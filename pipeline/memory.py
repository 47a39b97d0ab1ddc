"""Process memory: peak and current resident memory, giving freed heap back to the operating
system, and the GPU allocator's cache and peak. Stages and evaluations call these between models.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys


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
