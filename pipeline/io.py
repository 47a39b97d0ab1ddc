"""Small, crash-safe file helpers shared by the stages."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

from pipeline import faults

T = TypeVar("T")
log = logging.getLogger(__name__)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to ``path`` via a temporary file and an atomic rename; returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        faults.checkpoint("io.replace", path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary file behind
        raise
    os.replace(tmp, path)
    return n


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content, decompressed first when its name ends in ``.gz``."""
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def content_digest(path: str | Path) -> str:
    """sha256 of a data file's content: of the decompressed bytes for a ``.gz`` file, so a
    compressed copy and the original identify as the same data."""
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return hashlib.sha256(raw).hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def iter_chunks(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start : start + size]


def chunked_map(
    items: Sequence[T],
    fn: Callable[[int, Sequence[T]], list[dict[str, Any]]],
    *,
    work: Path,
    chunk_size: int,
    desc: str,
) -> list[dict[str, Any]]:
    """Apply ``fn`` chunk by chunk, committing each chunk's rows to ``work/chunks/NNNNN.jsonl``.

    Chunks already on disk (from a run that crashed with the same cache key) are read back
    instead of recomputed, so a crash loses at most the chunk in flight. ``fn`` gets the chunk
    index so it can derive a per-chunk random seed; results are then identical whether or not
    the run was interrupted.
    """
    chunk_dir = work / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    reused = len(list(chunk_dir.glob("*.jsonl")))
    if reused:
        log.info("%s: reusing %d chunk(s) committed before an interruption", desc, reused)
    out: list[dict[str, Any]] = []
    with tqdm(total=len(items), desc=desc, unit="item") as bar:
        for index, chunk in iter_chunks(items, chunk_size):
            path = chunk_dir / f"{index:05d}.jsonl"
            if path.exists():
                rows = read_jsonl(path)
            else:
                rows = fn(index, chunk)
                if len(rows) != len(chunk):
                    raise RuntimeError(f"{desc}: chunk {index} returned {len(rows)} rows for {len(chunk)} items")
                write_jsonl(path, rows)
                faults.checkpoint("chunk.committed", path)
            out.extend(rows)
            bar.update(len(chunk))
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temporary file and an atomic rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) via a temporary file and an atomic rename: a crash or a full disk
    leaves the old content or the new, never a truncated file (the temporary one is removed when
    the write fails)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        faults.checkpoint("io.replace", path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
