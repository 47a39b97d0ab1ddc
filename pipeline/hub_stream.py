"""Unlabelled documents streamed from a dataset, so a corpus of half a million segments does not
need the whole dataset on disk.

A source is written ``hub-stream:<dataset>?key=value&...``, for example::

    hub-stream:allenai/c4?config=en&split=train&limit=400000
    hub-stream:HuggingFaceFW/fineweb?config=sample-10BT&field=text&revision=<commit>&limit=400000
    hub-stream:json?data_files=/data/web/*.jsonl.gz          # a packaged builder on local files

Keys: ``config`` (the dataset's config name), ``split`` (default ``train``), ``field`` (the text
field, default ``unlabelled.text_field``), ``revision`` (branch, tag or commit; pin a commit for a
reproducible corpus), ``limit`` (stop after this many records of the stream, rejected ones
included), ``data_files`` (files for a packaged builder: ``json``, ``parquet``, ``csv``, ``text``).
Every source is read with ``datasets.load_dataset(..., streaming=True)``; dataset scripts are never
run (no ``trust_remote_code``). What was read (dataset, config, split, the commit the revision
resolved to, records read, why reading stopped) is recorded in the corpus stage's manifest.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl

PREFIX = "hub-stream:"
PACKAGED_BUILDERS = ("json", "parquet", "csv", "text", "arrow")
_KEYS = ("config", "split", "field", "revision", "limit", "data_files")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    dataset: str
    config: str | None = None
    split: str = "train"
    field: str | None = None
    revision: str | None = None
    limit: int | None = None
    data_files: str | None = None

    @property
    def local(self) -> bool:
        """A packaged builder reading local files: no hub repository, no commit."""
        return self.dataset in PACKAGED_BUILDERS


def is_stream(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse(spec: str) -> StreamSpec:
    """The parts of ``hub-stream:<dataset>?k=v&...``; an unknown key or a bad limit is an error."""
    from pipeline.data import DataError

    body = spec[len(PREFIX):]
    dataset, _, query = body.partition("?")
    if not dataset:
        raise DataError(f"{spec}: no dataset named (hub-stream:<dataset>?config=...&split=...)")
    values: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _KEYS:
            raise DataError(f"{spec}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in values:
            raise DataError(f"{spec}: key {key!r} given twice")
        values[key] = value
    if "limit" in values:
        try:
            values["limit"] = int(values["limit"])
        except ValueError:
            raise DataError(f"{spec}: limit must be a whole number, got {values['limit']!r}") from None
        if values["limit"] < 1:
            raise DataError(f"{spec}: limit must be at least 1")
    parsed = StreamSpec(dataset, **values)
    if parsed.local and not parsed.data_files:
        raise DataError(f"{spec}: the packaged builder {dataset!r} needs data_files=")
    if parsed.data_files and not parsed.local:
        raise DataError(f"{spec}: data_files= is for the packaged builders ({', '.join(PACKAGED_BUILDERS)}); "
                        f"a hub dataset names its files itself")
    return parsed


def resolve(spec: str, data_dir: str | Path | None) -> str:
    """``data_files`` relative to ``data.dir``, as file paths are."""
    parsed = parse(spec)
    if not parsed.data_files or data_dir is None or Path(parsed.data_files).expanduser().is_absolute():
        return spec
    full = str(Path(data_dir).expanduser() / parsed.data_files)
    return spec.replace(f"data_files={parsed.data_files}", f"data_files={full}", 1)


def fingerprint(spec: str) -> str:
    """The spec, plus the sha256 of each local data file, so a changed file reruns the corpus."""
    parsed = parse(spec)
    if not parsed.data_files:
        return spec
    digest = hashlib.sha256()
    for path in sorted(glob(str(Path(parsed.data_files).expanduser()))):
        digest.update(path.encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return f"{spec}#{digest.hexdigest()}"


def _hub_commit(parsed: StreamSpec) -> tuple[str | None, str | None]:
    """The commit the revision resolves to on the hub, or None and why not."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(parsed.dataset, revision=parsed.revision).sha, None
    except Exception as exc:  # offline, gated, renamed: the read itself decides whether that matters
        return None, f"{type(exc).__name__}: {exc}"[:300]


def open_stream(parsed: StreamSpec):
    """The ``datasets`` iterable for a parsed spec: the one call that reaches the hub."""
    import datasets

    kwargs: dict[str, Any] = {"split": parsed.split, "streaming": True}
    if parsed.revision:
        kwargs["revision"] = parsed.revision
    if parsed.data_files:
        kwargs["data_files"] = str(Path(parsed.data_files).expanduser())
    return datasets.load_dataset(parsed.dataset, parsed.config, **kwargs)


def read_stream(spec: str, info: dict[str, Any] | None = None) -> Iterator[Any]:
    """Records of a stream, up to its limit. ``info`` is filled with what is being read.

    A record the stream cannot decode (malformed JSON, a value of the wrong type for its column)
    ends the stream: ``datasets`` cannot skip past it. It becomes a reject, the stop is recorded
    (``stopped``) and logged, and the records before it are kept. Network errors are raised."""
    import pyarrow as pa

    from pipeline.data import DataError, Record, Reject

    parsed = parse(spec)
    info = info if info is not None else {}
    info.update({"dataset": parsed.dataset, "config": parsed.config, "split": parsed.split,
                 "revision": parsed.revision, "limit": parsed.limit, "streaming": True})
    if parsed.local:
        info["data_files"] = sorted(glob(str(Path(parsed.data_files).expanduser())))
        if not info["data_files"]:
            raise DataError(f"{spec}: no file matches data_files={parsed.data_files}")
    else:
        info["commit"], why = _hub_commit(parsed)
        if why:
            info["commit_unknown"] = why
    try:
        rows = iter(open_stream(parsed))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{spec}: cannot open the stream: {exc}") from exc
    info["stopped"] = "end of stream"
    index = 0
    while parsed.limit is None or index < parsed.limit:
        try:
            row = next(rows)
        except StopIteration:
            break
        except (pa.ArrowException, ValueError, TypeError) as exc:
            reason = f"stream error: {type(exc).__name__}: {exc}"
            log.warning("%s: reading stopped after %d records: %s", spec, index, reason[:300])
            info["stopped"] = f"after record {index}: {reason}"[:500]
            yield Reject(spec, index, reason[:500])
            return
        if isinstance(row, dict):
            yield Record(spec, index, row)
        else:
            yield Reject(spec, index, f"record is a {type(row).__name__}, not a mapping", str(row)[:200])
        index += 1
    else:
        info["stopped"] = f"limit of {parsed.limit} records"
