"""Generation chunks shared out to several workers with Ray, one engine per worker.

A generation stage maps a chunk function over its items chunk by chunk
(:func:`pipeline.io.chunked_map`); here the chunks go to Ray actors instead. Each actor builds
its state once (an engine, from a picklable ``setup`` factory) and then runs chunk after chunk;
the driver writes each chunk's rows to ``work/chunks/NNNNN.jsonl`` as they arrive, exactly as
``chunked_map`` does, so the chunk files, the resume (chunks on disk are read back, not
recomputed) and the output are the same whatever the number of workers: chunk functions derive
their seed from the chunk index, never from the worker. A worker that dies (killed, out of
memory, its node gone) is restarted by Ray, which runs the chunk it held again; nothing else is
redone.

:class:`LocalPool` is the same interface without Ray (``engine.workers: 1``): one state in this
process and ``chunked_map`` itself. :func:`open_pool` picks one.

Workers import this project's modules: a local Ray's workers run this interpreter with this
environment; on a cluster every node needs the project installed (or a Ray ``runtime_env``), and
the files the state reads (model folders) at the same paths.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from pipeline import faults
from pipeline.io import chunked_map, iter_chunks, read_jsonl, write_jsonl

T = TypeVar("T")
log = logging.getLogger(__name__)

ChunkFn = Callable[[Any, int, Sequence[Any]], list[dict[str, Any]]]
"""``fn(state, chunk_index, chunk) -> rows``, one row per item; must be picklable for Ray (a
module-level function or a ``functools.partial`` of one)."""
Counters = Callable[[Any], dict[str, float]]
"""Numbers a state keeps counting (e.g. an engine's new tokens), summed over the workers."""

KILL_ENV = "HUMPBACK_RAY_KILL_CHUNK"
"""Tests only: ``<chunk index>:<marker file>`` makes the worker given that chunk exit at once
(``os._exit``), the first time only: it creates the marker file before dying, and a worker that
finds the file goes on. Read by the driver and handed to its workers."""
RESTARTS = 3
"""How often Ray restarts a dead worker, and retries the chunk it held, before the stage fails."""
OBJECT_STORE_BYTES = 128 * 2**20
"""A local Ray's object store: chunks and their rows are small."""


@dataclass(frozen=True)
class PoolSettings:
    """Where generation runs: ``workers`` 1 in this process, more on Ray actors."""

    workers: int = 1
    address: str | None = None
    """None: start a local Ray in this process; ``auto`` or ``ray://host:port``: join that cluster."""
    cpus: float = 1.0
    """CPUs each worker reserves."""
    gpus: float = 0.0
    """GPUs each worker reserves (Ray sets its ``CUDA_VISIBLE_DEVICES``); fractions share a GPU."""
    restarts: int = RESTARTS


def open_pool(settings: PoolSettings, setup: Callable[[], Any], counters: Counters | None = None):
    """:class:`LocalPool` for one worker, else :class:`RayPool`; use it as a context manager."""
    if settings.workers <= 1:
        return LocalPool(setup, counters)
    return RayPool(settings, setup, counters)


def _add(totals: dict[str, float], delta: dict[str, float]) -> None:
    for key, value in delta.items():
        totals[key] = totals.get(key, 0) + value


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


class LocalPool:
    """The state in this process, built on first use; chunks through :func:`chunked_map`."""

    def __init__(self, setup: Callable[[], Any], counters: Counters | None = None):
        self._setup, self._counters, self._state = setup, counters, None

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def state(self) -> Any:
        if self._state is None:
            self._state = self._setup()
        return self._state

    def map_chunks(self, items: Sequence[T], fn: ChunkFn, *, work: Path, chunk_size: int,
                   desc: str) -> list[dict[str, Any]]:
        return chunked_map(items, lambda index, chunk: fn(self.state, index, chunk),
                           work=work, chunk_size=chunk_size, desc=desc)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(state)``."""
        return fn(self.state)

    def counters(self) -> dict[str, float]:
        if self._counters is None or self._state is None:
            return {}
        return dict(self._counters(self._state))

    def close(self) -> None:
        self._state = None


class _Worker:
    """The Ray actor: one state, built once, then chunk after chunk."""

    def __init__(self, setup: Callable[[], Any], counters: Counters | None, kill: tuple[int, str] | None):
        self._state = setup()
        self._counters = counters
        self._kill = kill

    def _count(self) -> dict[str, float]:
        return dict(self._counters(self._state)) if self._counters is not None else {}

    def _die_if_asked(self, index: int) -> None:
        if self._kill is None or self._kill[0] != index:
            return
        try:
            fd = os.open(self._kill[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # died here once already: this is the redo
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os._exit(1)

    def run(self, fn: ChunkFn, index: int, chunk: Sequence[Any]) -> tuple[int, list[dict[str, Any]], dict[str, float]]:
        self._die_if_asked(index)
        before = self._count()
        rows = fn(self._state, index, chunk)
        return index, rows, _delta(before, self._count())

    def call(self, fn: Callable[[Any], Any]) -> tuple[Any, dict[str, float]]:
        before = self._count()
        result = fn(self._state)
        return result, _delta(before, self._count())

    def pid(self) -> int:
        return os.getpid()


def _kill_spec() -> tuple[int, str] | None:
    spec = os.environ.get(KILL_ENV, "").strip()
    if not spec:
        return None
    index, _, marker = spec.partition(":")
    return int(index), marker


def connect(settings: PoolSettings):
    """The ``ray`` module, connected: to ``settings.address``, or to a local Ray started here
    with exactly the CPUs and GPUs the workers reserve, no dashboard and a small object store
    (nothing is fetched; it works offline). A Ray already connected in this process is kept."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent anywhere
    import ray

    if ray.is_initialized():
        return ray
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    if settings.address is not None:
        ray.init(address=settings.address, **common)
        return ray
    gpus = math.ceil(settings.workers * settings.gpus)
    if gpus:
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            raise ValueError(f"engine.workers x engine.worker_gpus needs {gpus} GPUs, this machine has {have}")
    ray.init(num_cpus=max(1, math.ceil(settings.workers * settings.cpus)), num_gpus=gpus,
             include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, **common)
    return ray


class RayPool:
    """``settings.workers`` Ray actors, each holding ``setup()``; killed on :meth:`close`."""

    def __init__(self, settings: PoolSettings, setup: Callable[[], Any], counters: Counters | None = None):
        self._ray = ray = connect(settings)
        self._check_resources(settings)
        actor = ray.remote(num_cpus=settings.cpus, num_gpus=settings.gpus, max_restarts=settings.restarts,
                           max_task_retries=settings.restarts)(_Worker)
        kill = _kill_spec()
        self._actors = [actor.remote(setup, counters, kill) for _ in range(settings.workers)]
        self._totals: dict[str, float] = {}
        log.info("generation on %d Ray workers (%g CPU, %g GPU each)", settings.workers, settings.cpus, settings.gpus)

    def _check_resources(self, settings: PoolSettings) -> None:
        """A local Ray that cannot hold every worker would wait for ever: say so instead."""
        total = self._ray.cluster_resources()
        for name, each in (("CPU", settings.cpus), ("GPU", settings.gpus)):
            need, have = settings.workers * each, total.get(name, 0)
            if need > have:
                message = (f"{settings.workers} workers x {each:g} {name} need {need:g} {name}s; "
                           f"the Ray cluster has {have:g}")
                if settings.address is None:
                    raise ValueError(message)
                log.warning("%s (waiting for the cluster to grow)", message)

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def map_chunks(self, items: Sequence[T], fn: ChunkFn, *, work: Path, chunk_size: int,
                   desc: str) -> list[dict[str, Any]]:
        """``fn`` over ``items`` chunk by chunk on the workers: the rows of every chunk in order,
        committed chunk files read back instead of recomputed (as :func:`chunked_map`)."""
        from ray.util import ActorPool

        chunk_dir = work / "chunks"
        chunk_dir.mkdir(parents=True, exist_ok=True)
        chunks = list(iter_chunks(items, chunk_size))
        path = {index: chunk_dir / f"{index:05d}.jsonl" for index, _ in chunks}
        rows: dict[int, list[dict[str, Any]]] = {i: read_jsonl(path[i]) for i, _ in chunks if path[i].exists()}
        if rows:
            log.info("%s: reusing %d chunk(s) committed before an interruption", desc, len(rows))
        pool = ActorPool(self._actors)
        for index, chunk in chunks:
            if index not in rows:
                pool.submit(lambda a, job: a.run.remote(fn, *job), (index, list(chunk)))
        done = sum(len(chunk) for index, chunk in chunks if index in rows)
        with tqdm(total=len(items), initial=done, desc=desc, unit="item") as bar:
            while pool.has_next():
                index, out, delta = pool.get_next_unordered()
                size = len(chunks[index][1])
                if len(out) != size:
                    raise RuntimeError(f"{desc}: chunk {index} returned {len(out)} rows for {size} items")
                write_jsonl(path[index], out)
                faults.checkpoint("chunk.committed", path[index])
                rows[index] = out
                _add(self._totals, delta)
                bar.update(size)
        return [row for index, _ in chunks for row in rows[index]]

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(state)`` on one worker (its result comes back through Ray)."""
        result, delta = self._ray.get(self._actors[0].call.remote(fn))
        _add(self._totals, delta)
        return result

    def pids(self) -> list[int]:
        return self._ray.get([a.pid.remote() for a in self._actors])

    def counters(self) -> dict[str, float]:
        """The counters' growth over every chunk and call that came back."""
        return dict(self._totals)

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)  # the engines go with them (their GPU memory too)
        self._actors = []
