"""Reading seed pairs and unlabelled documents, with every bad record accounted for.

Sources are files (JSONL, JSON, CSV, Parquet), ``hub:<dataset>[:split]`` ids, streamed datasets
(``hub-stream:<dataset>?config=...``, :mod:`pipeline.hub_stream`), packaged
``resource:<file>`` names, or ``pydoc:topics`` (the language reference shipped with Python).
A record that cannot be used becomes a :class:`Reject` naming its file, line and reason; the
loaders raise :class:`DataError` only when nothing usable remains.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from pipeline import hub_stream

PREVIEW_CHARS = 200
UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\udc80-\udcff]")


class DataError(ValueError):
    """Input data is unusable; the message names the file(s)."""


@dataclass(frozen=True)
class Reject:
    file: str
    line: int | None
    reason: str
    preview: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    file: str
    line: int | None
    data: dict[str, Any]


def resolve_source(spec: str, data_dir: str | Path | None) -> str:
    """Turn a config path into something :func:`read_source` opens (relative to ``data_dir``)."""
    if spec.startswith(hub_stream.PREFIX):
        return hub_stream.resolve(spec, data_dir)
    if spec.startswith(("hub:", "resource:", "pydoc:")):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = Path(data_dir).expanduser() / path
    return str(path)


def source_fingerprint(spec: str) -> str:
    """What identifies a source's content: a file's sha256, else the spec (and Python version
    for ``pydoc:``), so a changed file reruns the stages that read it."""
    if spec.startswith("pydoc:"):
        import sys

        return f"{spec}@{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if spec.startswith(hub_stream.PREFIX):
        return hub_stream.fingerprint(spec)
    if spec.startswith("resource:"):
        ref = resources.files("pipeline") / "resources" / spec[len("resource:") :]
        return hashlib.sha256(ref.read_bytes()).hexdigest() if ref.is_file() else spec
    path = Path(spec)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return spec


def read_source(spec: str, info: dict[str, Any] | None = None) -> Iterator[Record | Reject]:
    """Yield the records of one source, or rejects for lines that cannot be parsed. A streamed
    source fills ``info`` with what it reads (dataset, config, commit, why it stopped)."""
    if spec.startswith(hub_stream.PREFIX):
        yield from hub_stream.read_stream(spec, info)
        return
    if spec.startswith("hub:"):
        yield from _read_hub(spec[4:])
        return
    if spec.startswith("pydoc:"):
        yield from _read_pydoc(spec)
        return
    if spec.startswith("resource:"):
        name = spec[len("resource:") :]
        ref = resources.files("pipeline") / "resources" / name
        if not ref.is_file():
            raise DataError(f"{spec}: no packaged resource named {name!r}")
        yield from _read_bytes(spec, name, ref.read_bytes())
        return
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: file not found")
    yield from _read_bytes(spec, path.name, path.read_bytes())


def _read_bytes(label: str, name: str, raw: bytes) -> Iterator[Record | Reject]:
    if name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{label}: not a readable gzip file: {exc}") from exc
        name = name[: -len(".gz")]
    suffix = name.lower().rsplit(".", 1)[-1]
    if suffix in ("jsonl", "ndjson"):
        yield from _read_jsonl(label, raw)
    elif suffix == "json":
        yield from _read_json(label, raw)
    elif suffix == "csv":
        yield from _read_csv(label, raw)
    elif suffix == "parquet":
        yield from _read_parquet(label, raw)
    else:
        raise DataError(f"{label}: unknown format {suffix!r} (use .jsonl, .json, .csv or .parquet, each "
                        f"optionally .gz)")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: an object naming a key twice is ambiguous (which value did the writer
    mean?), so it is an error rather than the last value silently winning."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys)


def _read_jsonl(label: str, raw: bytes) -> Iterator[Record | Reject]:
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Reject(label, lineno, f"not UTF-8: {exc.reason} at byte {exc.start}", _preview(line))
            continue
        try:
            obj = _loads(text)
        except json.JSONDecodeError as exc:
            yield Reject(label, lineno, f"malformed JSON: {exc.msg}", _preview(text))
            continue
        except _DuplicateKey as exc:
            yield Reject(label, lineno, f"duplicate key: {str(exc)!r} appears twice in one object", _preview(text))
            continue
        except RecursionError:
            yield Reject(label, lineno, "malformed JSON: nested too deeply", _preview(text))
            continue
        if not isinstance(obj, dict):
            yield Reject(label, lineno, f"record is a JSON {type(obj).__name__}, not an object", _preview(text))
            continue
        yield Record(label, lineno, obj)


def _read_json(label: str, raw: bytes) -> Iterator[Record | Reject]:
    try:
        obj = _loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{label}: not a valid UTF-8 JSON document: {exc}") from exc
    except _DuplicateKey as exc:
        raise DataError(f"{label}: key {str(exc)!r} appears twice in one object (ambiguous); fix the file, "
                        f"or use JSONL, where such a record is rejected alone") from exc
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{label}: expected a list of records or an object holding one list")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{label}: expected a list of records, got {type(obj).__name__}")
    for index, item in enumerate(obj):
        if isinstance(item, dict):
            yield Record(label, index, item)
        else:
            yield Reject(label, index, f"record is a JSON {type(item).__name__}, not an object", _preview(item))


def _read_csv(label: str, raw: bytes) -> Iterator[Record | Reject]:
    # Bytes that are not UTF-8 become lone surrogates, so the rows around them are still read and
    # only the rows holding them are rejected.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over the size limit; the reader goes on after it
            yield Reject(label, reader.line_num, f"malformed CSV: {exc}")
            continue
        if None in row:
            yield Reject(label, reader.line_num, "row has more cells than the header", _preview(row))
        elif any(_SURROGATE.search(v) for v in row.values() if isinstance(v, str)) or (
                reader.fieldnames and any(_SURROGATE.search(f) for f in reader.fieldnames)):
            yield Reject(label, reader.line_num, "not UTF-8: undecodable bytes in the row or the header",
                         _preview(row))
        else:
            yield Record(label, reader.line_num, dict(row))


def _read_parquet(label: str, raw: bytes) -> Iterator[Record | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{label}: not a readable Parquet file: {exc}") from exc
    for index, row in enumerate(table.to_pylist()):
        yield Record(label, index, row)


def _read_hub(spec: str) -> Iterator[Record | Reject]:
    import datasets

    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    for index, row in enumerate(ds):
        yield Record(f"hub:{spec}", index, dict(row))


def _read_pydoc(spec: str) -> Iterator[Record | Reject]:
    if spec != "pydoc:topics":
        raise DataError(f"{spec}: only 'pydoc:topics' is known")
    from pydoc_data.topics import topics

    for index, (topic, text) in enumerate(sorted(topics.items())):
        yield Record(spec, index, {"text": text, "topic": topic})


def _preview(value: Any) -> str:
    """The start of a bad record as printable text (undecodable bytes replaced, so a rejects file
    can always be written)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text[:PREVIEW_CHARS].encode("utf-8", "replace").decode("utf-8")


def _text_field(record: Record, field: str) -> str | Reject:
    if field not in record.data:
        return Reject(record.file, record.line, f"missing field {field!r}", _preview(record.data))
    value = record.data[field]
    if not isinstance(value, str):
        return Reject(record.file, record.line, f"field {field!r} is {type(value).__name__}, not text", _preview(value))
    if "\x00" in value:
        return Reject(record.file, record.line, f"field {field!r} contains NUL bytes", _preview(value))
    if not value.strip():
        return Reject(record.file, record.line, f"field {field!r} is empty", "")
    return value.strip()


@dataclass
class Loaded:
    rows: list[dict[str, Any]]
    rejects: list[Reject]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source: records read, rows kept, rejects, and for a stream what it was (dataset,
    config, split, revision and the commit it resolved to, why reading stopped)."""

    def stats(self) -> dict[str, Any]:
        reasons = Counter(_reason_kind(r.reason) for r in self.rejects)
        return {"kept": len(self.rows), "rejected": len(self.rejects), "reject_reasons": dict(sorted(reasons.items()))}


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def load_pairs(
    sources: list[str], instruction_field: str, response_field: str, limit: int | None = None
) -> Loaded:
    """Seed (instruction, response) pairs from every source, with rejects."""
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    seen: set[tuple[str, str]] = set()
    for source in sources:
        for item in read_source(source):
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            instruction = _text_field(item, instruction_field)
            response = _text_field(item, response_field)
            bad = next((x for x in (instruction, response) if isinstance(x, Reject)), None)
            if bad is not None:
                rejects.append(bad)
                continue
            if (instruction, response) in seen:
                rejects.append(Reject(item.file, item.line, "duplicate pair", _preview(instruction)))
                continue
            seen.add((instruction, response))
            rows.append({"instruction": instruction, "response": response, "origin": f"{item.file}:{item.line}"})
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"no usable seed pairs in {', '.join(sources)} ({len(rejects)} rejected; first: "
                        f"{rejects[0].reason if rejects else 'no records'})")
    return Loaded(rows, rejects)


def load_documents(sources: list[str], text_field: str, limit: int | None = None) -> Loaded:
    """Unlabelled documents from every source, with rejects; at most ``limit`` documents in all.
    A streamed source may name its own text field (``field=``)."""
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    read: dict[str, dict[str, Any]] = {}
    for source in sources:
        if limit is not None and len(rows) >= limit:
            read[source] = {"records_read": 0, "stopped": f"not opened: unlabelled.limit of {limit} documents reached"}
            continue
        info: dict[str, Any] = {}
        source_field = text_field
        if hub_stream.is_stream(source):
            source_field = hub_stream.parse(source).field or text_field
            info["field"] = source_field
        counts = {"records_read": 0, "kept": 0, "rejected": 0}
        items = read_source(source, info)
        for item in items:
            if limit is not None and len(rows) >= limit:
                info["stopped"] = f"unlabelled.limit of {limit} documents"
                break
            counts["records_read"] += 1
            if isinstance(item, Reject):
                rejects.append(item)
                counts["rejected"] += 1
                continue
            text = _text_field(item, source_field)
            if isinstance(text, Reject):
                rejects.append(text)
                counts["rejected"] += 1
                continue
            rows.append({"doc_id": f"{item.file}:{item.line}", "text": text})
            counts["kept"] += 1
        items.close()
        read[source] = {**info, **counts}
    if not rows:
        raise DataError(f"no usable documents in {', '.join(sources)} ({len(rejects)} rejected; first: "
                        f"{rejects[0].reason if rejects else 'no records'})")
    return Loaded(rows, rejects, read)
