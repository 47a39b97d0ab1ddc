"""The corpus stage run through datatrove (``corpus.executor: datatrove``).

datatrove (HuggingFace's large-scale text processing library) supplies the machinery that lets a
corpus of millions of documents be prepared in parallel: JSONL readers and writers over sharded
folders, filter steps that count and keep what they drop, MinHash deduplication in four passes
over files on disk (signatures, LSH buckets, clusters, filter), and executors that run each pass
as tasks on this machine (``LocalPipelineExecutor``), a Ray cluster or Slurm.

What stays this project's own, run inside datatrove's steps: the segmenting (text under headers
packed into 600-3,000 character segments; datatrove has no such splitter), the quality filters
(the thresholds in :class:`~pipeline.settings.CorpusSection` are this project's measures, not
datatrove's Gopher filters, whose n-gram ranges and line measures differ), the word shingles
(lower-cased ``\\w+`` 5-grams, so both paths hash the same shingles) and which segment of a
duplicate cluster is kept (the first in corpus order, as the built-in path keeps it).

Where the two paths may differ: datatrove's MinHash uses other hash functions than datasketch's
(same bands and rows, different random permutations), so a pair near the threshold may be caught
by one and not the other; and datatrove's clusters are transitive (A~B and B~C put A, B and C in
one cluster), where the built-in path compares each segment only with those already kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer
from datasketch import MinHashLSH

from pipeline.corpus import _normalized, filter_reason, finish, segment_document, words
from pipeline.settings import CorpusSection

log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+", re.UNICODE)
_AS_IS = TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                        norm_unicode_diacritics=False, norm_numbers=False)


class ProjectWords(WordTokenizer):
    """The built-in path's words (lower-cased ``\\w+`` runs), so MinHash shingles are the same."""

    def __init__(self) -> None:
        super().__init__("eng")

    def word_tokenize(self, text: str) -> list[str]:
        return words(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD.finditer(text)]


class SegmentDocuments(PipelineStep):
    """One datatrove document per segment (:func:`pipeline.corpus.segment_document`)."""

    name = "segment"
    type = "humpback"

    def __init__(self, max_chars: int) -> None:
        super().__init__()
        self.max_chars = max_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("documents")
            for seg in segment_document(doc.id, doc.text, self.max_chars):
                self.stat_update("segments")
                yield Document(text=seg.text, id=f"{seg.doc_id}#{seg.index}",
                               metadata={"order": [doc.metadata["doc_index"], seg.index], "heading": seg.heading})


class QualityFilters(BaseFilter):
    """The corpus filters (:func:`pipeline.corpus.filter_reason`) as one datatrove filter: a
    dropped segment is counted as ``dropped_<reason>`` and written with its reason."""

    name = "quality filters"

    def __init__(self, cfg: CorpusSection, exclusion_writer: JsonlWriter) -> None:
        super().__init__(exclusion_writer=exclusion_writer)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = filter_reason(doc.text, self.cfg)
        return (False, reason) if reason else True


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band as datasketch chooses them for the built-in path, so both paths
    band their signatures alike."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _executor(cfg: CorpusSection, pipeline: list, tasks: int, logs: Path, workers: int | None = None):
    options = {k: v for k, v in cfg.datatrove_options.items() if k != "wait_s"}  # wait_s: ours, see _run
    common = {"pipeline": pipeline, "tasks": tasks, "logging_dir": str(logs),
              "workers": workers or cfg.datatrove_workers or -1}
    if cfg.datatrove_executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(**common, **options)
    if cfg.datatrove_executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(**common, **options)
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(**common, job_name=f"humpback-corpus-{logs.name}", **options)


def _run(cfg: CorpusSection, name: str, pipeline: list, tasks: int, root: Path, workers: int | None = None) -> list:
    """One datatrove pass, waited for (Slurm's sbatch returns at once: the stage polls for the
    tasks' completion files, up to ``datatrove_options.wait_s`` seconds); its merged step stats."""
    logs = root / "logs" / name
    _executor(cfg, pipeline, tasks, logs, workers).run()
    completions = logs / "completions"
    deadline = time.monotonic() + float(cfg.datatrove_options.get("wait_s", 7 * 24 * 3600)) \
        if cfg.datatrove_executor == "slurm" else time.monotonic()
    while True:
        done = len(list(completions.iterdir())) if completions.is_dir() else 0
        if done >= tasks or time.monotonic() >= deadline:
            break
        time.sleep(10)
    if done < tasks:
        raise RuntimeError(f"datatrove pass {name!r}: {done} of {tasks} tasks completed (logs: {logs})")
    stats = logs / "stats.json"
    return json.loads(stats.read_text()) if stats.is_file() else []


def _read(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _step_counts(stats: list) -> dict[str, dict[str, Any]]:
    """datatrove's per-step counters (documents in, forwarded, dropped, dropped_<reason>)."""
    out: dict[str, dict[str, Any]] = {}
    for step in stats:
        counters = {k: (v.get("total") if isinstance(v, dict) else v) for k, v in step.get("stats", {}).items()}
        name = " ".join(re.sub(r"[^\x20-\x7e]", " ", step.get("name", "?")).replace(" - ", " ").split())
        out[name] = {k: v for k, v in counters.items() if isinstance(v, (int, float))}
    return out


def prepare_corpus_datatrove(documents: Iterable[dict[str, Any]], cfg: CorpusSection, seed: int
                             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """As :func:`pipeline.corpus.prepare_corpus`, the work done by datatrove's executors."""
    parent = Path(cfg.datatrove_dir).expanduser() if cfg.datatrove_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="corpus-datatrove-", dir=parent))
    try:
        out = _prepare(documents, cfg, seed, root)
    except BaseException:
        log.error("datatrove corpus preparation failed; its folder is kept: %s", root)
        raise
    shutil.rmtree(root, ignore_errors=True)
    return out


def _prepare(documents: Iterable[dict[str, Any]], cfg: CorpusSection, seed: int, root: Path):
    docs = list(documents)
    tasks = max(1, min(cfg.datatrove_tasks, len(docs)))
    (root / "input").mkdir()
    for shard in range(tasks):  # contiguous shards: task r reads documents [r*n/t, (r+1)*n/t)
        lo, hi = shard * len(docs) // tasks, (shard + 1) * len(docs) // tasks
        with (root / "input" / f"{shard:05d}.jsonl").open("w", encoding="utf-8") as f:
            for i in range(lo, hi):
                f.write(json.dumps({"id": docs[i]["doc_id"], "text": docs[i]["text"], "metadata": {"doc_index": i}}) + "\n")

    def reader(folder: str) -> JsonlReader:
        return JsonlReader(str(root / folder), compression=None, glob_pattern="*.jsonl")

    def writer(folder: str) -> JsonlWriter:
        return JsonlWriter(str(root / folder), output_filename="${rank}.jsonl", compression=None)

    bands, rows_per_band = lsh_shape(cfg.minhash_threshold, cfg.minhash_num_perm)
    # sha1 shingle hashes: datatrove's default, xxhash, takes only bytes from xxhash 4 on (the
    # project's pin; datatrove's own extra asks for xxhash<4)
    minhash = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows_per_band, seed=1, norm_config=_AS_IS,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))
    steps: dict[str, Any] = {}
    steps["filter"] = _run(cfg, "filter", [reader("input"), SegmentDocuments(cfg.max_chars),
                                           QualityFilters(cfg, writer("removed")), writer("filtered")], tasks, root)
    filtered = any((root / "filtered").glob("*.jsonl"))
    if filtered:
        steps["signatures"] = _run(cfg, "signatures", [reader("filtered"), MinhashDedupSignature(
            output_folder=str(root / "signatures"), config=minhash, language=ProjectWords())], tasks, root)
        steps["buckets"] = _run(cfg, "buckets", [MinhashDedupBuckets(
            input_folder=str(root / "signatures"), output_folder=str(root / "buckets"), config=minhash)], bands, root)
        steps["clusters"] = _run(cfg, "clusters", [MinhashDedupCluster(
            input_folder=str(root / "buckets"), output_folder=str(root / "clusters"), config=minhash,
            save_cluster_id=True)], 1, root)
        # MinhashDedupFilter passes a task's documents through without their cluster ids when
        # nothing is to be removed from it (no .remove file): every task gets both files
        (root / "clusters").mkdir(exist_ok=True)  # not made when no document has a duplicate
        for rank in range(tasks):
            for suffix in (".remove", ".clusters"):
                (root / "clusters" / f"{rank:06d}{suffix}").touch(exist_ok=True)
        steps["dedup"] = _run(cfg, "dedup", [reader("filtered"), MinhashDedupFilter(
            input_folder=str(root / "clusters"), load_cluster_ids=True, exclusion_writer=writer("duplicates")),
            writer("deduped")], tasks, root)

    def order(row: dict[str, Any]) -> tuple[int, int]:
        return tuple(row["metadata"]["order"])

    def as_row(doc: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"segment_id": doc["id"], "heading": doc["metadata"]["heading"], "text": doc["text"], **extra}

    removed = [as_row(d, reason=d["metadata"]["filter_reason"]) for d in sorted(_read(root / "removed"), key=order)]
    passed = sorted(_read(root / "deduped") + _read(root / "duplicates"), key=order)
    n_segments = len(passed) + len(removed)
    kept: list[dict[str, Any]] = []
    first_text: dict[str, str] = {}
    first_in_cluster: dict[int, str] = {}
    for doc in passed:  # the first segment of a cluster (or of an exact text) is kept, in corpus order
        digest = hashlib.sha1(_normalized(doc["text"]).encode()).hexdigest()
        cluster = doc["metadata"].get("minhash_cluster_id", -1)
        if digest in first_text:
            removed.append(as_row(doc, reason="exact_duplicate", duplicate_of=first_text[digest]))
        elif cluster != -1 and cluster in first_in_cluster:
            removed.append(as_row(doc, reason="near_duplicate", duplicate_of=first_in_cluster[cluster]))
        else:
            kept.append(as_row(doc))
            first_text[digest] = doc["id"]
            if cluster != -1:
                first_in_cluster[cluster] = doc["id"]
    kept, removed, stats = finish(kept, removed, len(docs), n_segments, cfg, seed)
    stats["executor"] = "datatrove"
    stats["datatrove"] = {"executor": cfg.datatrove_executor, "tasks": tasks,
                          "minhash": {"bands": bands, "rows_per_band": rows_per_band, "n_grams": 5},
                          "clusters": len({d["metadata"].get("minhash_cluster_id", -1) for d in passed} - {-1}),
                          "steps": {name: _step_counts(s) for name, s in steps.items()}}
    return kept, removed, stats
