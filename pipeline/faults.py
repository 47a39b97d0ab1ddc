"""Fault injection at named sites: kill the process, or fail a write, exactly where a test says.

The code calls :func:`checkpoint` at the places where a crash or a full disk would leave the
run directory in an interesting state (a chunk just committed, a training step just ended, a
stage about to be renamed into place, ...). Nothing happens unless the environment asks:

``HUMPBACK_KILL_AT=<site>[@<stage>]:<n>``
    SIGKILL this process at the n-th call of ``checkpoint(site)`` (counted in this process, and
    only among calls made while stage ``<stage>`` runs when one is named). Example:
    ``HUMPBACK_KILL_AT=chunk.committed@augment:3``.
``HUMPBACK_FAULT_AT=<site>[@<stage>]:<n>:<ERRNO>``
    raise ``OSError(ERRNO, strerror, path)`` there instead (``ENOSPC``, ``EROFS``, ``EDQUOT``,
    ...): a disk that fills up or turns read-only at exactly that point.
``HUMPBACK_KILL_MARK=<file>``
    before killing or failing, append one JSON line naming the site, stage, call count and pid
    to this file, so a test knows where the process stopped without guessing from timing.

With none of these set a checkpoint is one dictionary lookup. The sites are listed in
:data:`SITES`; the stage a site fires in is set by the run directory (:func:`stage_scope`).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import signal
from typing import Iterator

KILL_ENV = "HUMPBACK_KILL_AT"
FAULT_ENV = "HUMPBACK_FAULT_AT"
MARK_ENV = "HUMPBACK_KILL_MARK"

SITES: dict[str, str] = {
    "commit.before": "a stage's manifest and .done are written in <name>.partial/, nothing renamed yet",
    "commit.old_moved": "the stage's earlier folder (another cache key) moved aside, the new one not yet in place",
    "commit.after": "<name>.partial/ renamed to <name>/, the loop not yet told",
    "io.replace": "a file's content written to its temporary name, not yet renamed over the real one",
    "chunk.committed": "a generation chunk's rows committed to <stage>/_scratch/progress/chunks/",
    "train.step": "a training step (optimizer update) ended, before any checkpoint of it is saved",
    "train.checkpoint": "a trainer checkpoint half saved: model weights written, optimizer and state not",
    "judge_check.planted": "the judge check's planted pairs judged, its calibration not yet run",
    "eval.answers": "an evaluation's AlpacaEval answers written, not yet judged",
    "eval.judged": "an evaluation's AlpacaEval answers judged (the judge cache saved), held-out tasks not run",
    "eval.heldout": "an evaluation's held-out tasks scored, summary.json not yet written",
    "h2h.opponent": "a head-to-head stage has judged M_t against one earlier model",
    "report.plots": "the report's plots drawn, report.md and report.html not yet written",
    "report.markdown": "report.md written, report.html not yet",
    "mlflow.parent": "the MLflow parent run found or created, no child logged yet",
    "mlflow.metrics": "a child run's metrics logged, its files, datasets and fingerprint not yet",
    "mlflow.child": "a child run completely logged (fingerprint tag written)",
}
"""Every site :func:`checkpoint` is called at, and the state the run is in when it fires there."""

WRITE_ERRNOS = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EROFS, errno_codes.EFBIG})
"""OS errors that mean the file system will not take what the run writes."""

_stage: str | None = None
_counts: dict[str, int] = {}


@contextlib.contextmanager
def stage_scope(name: str) -> Iterator[None]:
    """Mark the calls inside as made while stage ``name`` runs (``site@name`` specs match them)."""
    global _stage
    outer, _stage = _stage, name
    try:
        yield
    finally:
        _stage = outer


def checkpoint(site: str, path: str | os.PathLike | None = None) -> None:
    """A named fault site; kills the process or raises ``OSError`` when the environment names it.

    Args:
        site: one of :data:`SITES`.
        path: the file being written there, if any (named by an injected ``OSError``).
    """
    environ = os.environ
    if KILL_ENV not in environ and FAULT_ENV not in environ:
        return
    _trigger(site, path)


def _matches(spec: str, site: str) -> int | None:
    """The call count ``n`` of ``spec`` when it names ``site`` (and the current stage), else None."""
    where, _, count = spec.partition(":")
    wanted, _, stage = where.partition("@")
    if wanted != site or (stage and stage != _stage):
        return None
    return int(count.split(":")[0] or 1)


def _trigger(site: str, path: str | os.PathLike | None) -> None:
    if site not in SITES:
        raise ValueError(f"unknown fault site {site!r}; known: {', '.join(SITES)}")
    for env, action in ((KILL_ENV, "kill"), (FAULT_ENV, "fault")):
        spec = os.environ.get(env, "").strip()
        n = _matches(spec, site) if spec else None
        if n is None:
            continue
        _counts[spec] = _counts.get(spec, 0) + 1
        if _counts[spec] != n:
            continue
        _mark(action, site, n, path)
        if action == "kill":
            # The whole process group when this process leads one (a shell job, a test's
            # subprocess), so nothing it started lives on; else this process alone.
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        name = spec.rsplit(":", 1)[1] if spec.count(":") >= 2 else "ENOSPC"
        code = getattr(errno_codes, name)
        raise OSError(code, os.strerror(code), None if path is None else os.fspath(path))


def _mark(action: str, site: str, n: int, path: str | os.PathLike | None) -> None:
    mark = os.environ.get(MARK_ENV)
    if not mark:
        return
    line = json.dumps({"action": action, "site": site, "stage": _stage, "n": n, "pid": os.getpid(),
                       "path": None if path is None else os.fspath(path)})
    with open(mark, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def reset_counts() -> None:
    """Forget the calls counted so far (in-process tests that inject faults run after run)."""
    _counts.clear()


def write_error(exc: BaseException) -> OSError | None:
    """The error in ``exc``'s chain that says the file system would not take a write (full,
    read-only, over quota), or None.

    Libraries that write files themselves (safetensors, torch) report a full disk in their own
    exception types; their message still carries the OS's words, which are recognised here (the
    path is then unknown)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        text = str(current)
        for code in WRITE_ERRNOS:
            if os.strerror(code) in text:
                return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None
