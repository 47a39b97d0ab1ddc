"""The run directory: truth on disk, step-level caching and crash-safe stage commits.

Each stage writes into ``<name>.partial/`` and is committed by renaming that folder to
``<name>/`` after ``manifest.json`` and the ``.done`` marker are written. A stage is skipped only
when ``<name>/.done`` exists and the manifest's cache key (stage version, settings digest, input
digests) equals the key asked for, so a killed process can never leave something that is later
taken as finished. A partial folder whose key matches is handed back to the stage, which may
reuse the chunks it already committed there; temporary files of writes the crash cut short
(``*.tmp<pid>``) are removed first, so they never become outputs. An earlier commit of the stage
(another key) is moved aside in one rename before the new folder takes its name, and deleted
after, so no crash leaves a half-deleted folder that still has ``.done``. The fault sites of
:mod:`pipeline.faults` (``commit.before``, ``commit.old_moved``, ``commit.after``) let tests kill
a run at each of these steps.

Runs can share stages (``run.share_stages_from``): before computing a stage, the run directories
named there are searched for the same stage committed under exactly the same cache key; the first
found is copied in (hard links where the file system allows), checked against its output digest,
and then taken like a cached stage. A stage whose key differs anywhere is never taken.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import faults, memory
from pipeline.digests import combine_digests, package_versions, settings_digest, tree_digests
from pipeline.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DONE = ".done"
KEY = ".key"
SCRATCH = "_scratch"
LOGS = "logs"  # recorded in the manifest but left out of the output digest (timings differ per run)
LOCK = ".lock"
OLD = ".old"  # an earlier commit of a stage, moved aside while the new one takes its name
ORPHAN = re.compile(r".+\.tmp\d+")
"""Temporary files of the project's atomic writes (``<name>.tmp<pid>``): one still there in a
partial folder is a write that a crash cut short."""

_HELD: dict[str, int] = {}
"""Run directories this process holds the lock of (resolved path -> open file descriptor)."""


class RunDirBusy(RuntimeError):
    """Another process holds the run directory; the message names it."""
TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "datasketch", "numpy")


def output_digests(work: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of a stage's output files (its manifest, markers and scratch left out)."""
    return tree_digests(work, exclude=(MANIFEST, DONE, KEY), skip_dirs=(SCRATCH,))


def output_digest(files: dict[str, dict[str, Any]]) -> str:
    """The stage's output digest over :func:`output_digests` (logs left out: timings differ)."""
    return combine_digests(files, skip_prefixes=(LOGS + "/",))


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

    @property
    def scratch(self) -> Path:
        path = self.work / SCRATCH
        path.mkdir(exist_ok=True)
        return path


StageFn = Callable[[StageContext], dict[str, Any]]


class RunDir:
    """One run's directory; ``stage`` runs or skips a stage by its cache key."""

    def __init__(self, root: str | Path, share_from: list[str | Path] | tuple[str | Path, ...] = ()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, StageResult] = {}
        self.share_from: list[Path] = [Path(p) for p in share_from]
        """Other run directories whose committed stages this run takes when the cache key matches."""

    def path(self, name: str) -> Path:
        return self.root / name

    def lock(self) -> None:
        """Hold the run directory for this process until it exits: a second process that asks is
        refused with :class:`RunDirBusy`. The lock is the kernel's (``flock`` on ``.lock``), so a
        process that is killed cannot leave it behind; the file only says who held it last.

        Raises:
            RunDirBusy: another process holds it; the message names its pid, host and start.
        """
        key = str(self.root.resolve())
        if key in _HELD:
            return
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"run directory {self.root} is in use by another process ({holder}); wait for it "
                             f"to finish or choose another --run-dir (the lock goes with that process, even if "
                             f"it is killed)") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[key] = fd

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
        try:
            manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # never taken as finished: the stage is run again
            log.warning("stage %s: %s has .done but no readable manifest (%s); running it again", name, final, exc)
            return None
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
        with faults.stage_scope(name):  # fault sites inside can be named per stage (tests)
            try:
                return self._stage(name, fn, version=version, settings=settings, inputs=inputs)
            except Exception as exc:
                if faults.write_error(exc) is not None:  # a full or read-only disk: say where it struck
                    exc.add_note(f"while stage {name} was running (its work so far: {self.path(name)}.partial)")
                raise

    def _stage(self, name: str, fn: StageFn, *, version: str, settings: dict[str, Any],
               inputs: dict[str, StageResult] | None) -> StageResult:
        inputs = inputs or {}
        key = self.cache_key(name, version, settings, inputs)
        final = self.path(name)
        work = final.with_name(final.name + ".partial")

        done = self.load(name)
        if done is not None and done.manifest.get("cache_key") == key:
            log.info("stage %s: cached (key %s), skipping", name, key)
            if final.with_name(final.name + OLD).exists():  # left by a crash just after its commit
                shutil.rmtree(final.with_name(final.name + OLD), ignore_errors=True)
            self.results[name] = done
            return done
        if (work / DONE).exists() and _read(work / KEY) == key:
            log.info("stage %s: finished before a crash, committing", name)
            return self._commit(name, work, final)
        shared = self._take_shared(name, key, final, work)
        if shared is not None:
            return shared

        if work.exists() and _read(work / KEY) != key:
            shutil.rmtree(work)
        elif work.exists():  # resumed: the chunks and checkpoints stay, writes cut short go
            for orphan in [p for p in work.rglob("*") if ORPHAN.fullmatch(p.name) and p.is_file()]:
                log.info("stage %s: removing %s, a write cut short by the crash", name, orphan)
                orphan.unlink()
        work.mkdir(parents=True, exist_ok=True)
        (work / KEY).write_text(key)

        log.info("stage %s: running (key %s)", name, key)
        started = time.time()
        memory.trim_heap()
        rss_start = memory.current_rss_mib()
        peak_scope = memory.reset_peak_rss()
        memory.reset_gpu_peak()
        ctx = StageContext(name=name, work=work, settings=settings, inputs=inputs, key=key)
        stats = fn(ctx)
        finished = time.time()
        peak = memory.peak_rss_mib()
        gpu_peak = memory.gpu_peak_mib()
        if peak is None or rss_start is None or peak - rss_start > memory.RELEASE_AFTER_MIB:
            memory.release_memory()
        else:
            memory.trim_heap()  # a full garbage collection takes a noticeable time with the ML libraries loaded
            memory.release_gpu_cache()
        rss_end = memory.current_rss_mib()
        log.info("stage %s: done in %.1f s; memory peak %s MiB, %s MiB at start, %s MiB after%s",
                 name, finished - started, peak, rss_start, rss_end,
                 f"; GPU peak {gpu_peak} MiB" if gpu_peak is not None else "")

        shutil.rmtree(work / SCRATCH, ignore_errors=True)
        files = output_digests(work)
        manifest = {
            "stage": name,
            "version": version,
            "cache_key": key,
            "settings": settings,
            "settings_digest": settings_digest(settings),
            "inputs": {k: {"stage": v.name, "digest": v.digest} for k, v in inputs.items()},
            "outputs": files,
            "output_digest": output_digest(files),
            "stats": stats,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(finished - started, 3),
            "peak_rss_mib": peak,
            "peak_rss_scope": peak_scope,
            "rss_start_mib": rss_start,
            "rss_end_mib": rss_end,
            "gpu_peak_mib": gpu_peak,
            "packages": package_versions(TRACKED_PACKAGES),
        }
        write_json_atomic(work / MANIFEST, manifest)
        write_text_atomic(work / DONE, key)
        return self._commit(name, work, final)

    def _take_shared(self, name: str, key: str, final: Path, work: Path) -> StageResult | None:
        """The stage committed under ``key`` in one of :attr:`share_from`, copied in and committed
        here; None when none holds it.

        The copy's files are checked against the source manifest's output digest before it is
        committed, so a source that changed (or was being rewritten) while it was copied is passed
        over. The manifest here says where the stage came from (``reused_from``, with the source's
        own timings and memory) and what taking it cost; hard-linked files are never written in
        place (every writer of a stage folder replaces files by renaming), so the source is safe."""
        own = self.root.resolve()
        for source in self.share_from:
            src = source / name
            if not source.is_dir() or source.resolve() == own or not (src / DONE).exists():
                continue
            try:
                manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("cache_key") != key:
                log.info("stage %s: %s holds it under another key (%s), not taken", name, source,
                         manifest.get("cache_key"))
                continue
            started = time.time()
            copy = final.with_name(final.name + ".shared")
            shutil.rmtree(copy, ignore_errors=True)
            try:
                shutil.copytree(src, copy, copy_function=_link_or_copy)
                intact = (_read(copy / DONE) == key
                          and output_digest(output_digests(copy)) == manifest.get("output_digest"))
            except OSError as exc:
                log.warning("stage %s: copying it from %s failed (%s); computing it instead", name, source, exc)
                intact = False
            if not intact:
                log.warning("stage %s: %s changed while it was copied; not taken", name, source)
                shutil.rmtree(copy, ignore_errors=True)
                continue
            timing = ("started", "seconds", "peak_rss_mib", "peak_rss_scope", "rss_start_mib", "rss_end_mib",
                      "gpu_peak_mib")
            seconds = round(time.time() - started, 3)
            manifest = {**manifest, **{k: None for k in timing},
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "seconds": seconds,
                        "reused_from": {"run_dir": str(source), **{k: manifest.get(k) for k in timing}}}
            write_json_atomic(copy / MANIFEST, manifest)  # a new file: the source keeps its own
            shutil.rmtree(work, ignore_errors=True)
            log.info("stage %s: reused from %s (key %s, %.1f s)", name, source, key, seconds)
            result = self._commit(name, copy, final)
            self.results[name] = StageResult(result.name, result.path, result.manifest, skipped=True)
            return self.results[name]
        return None

    def _commit(self, name: str, work: Path, final: Path) -> StageResult:
        faults.checkpoint("commit.before", work)
        old = final.with_name(final.name + OLD)
        if final.exists():
            # Out of the way in one rename, deleted once the new folder is in place: removing it
            # in place could be cut short, leaving a half-deleted folder that still has .done.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            faults.checkpoint("commit.old_moved", old)
        os.replace(work, final)
        faults.checkpoint("commit.after", final)
        shutil.rmtree(old, ignore_errors=True)
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
            "packages": package_versions(TRACKED_PACKAGES),
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


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link where the file system allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


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
