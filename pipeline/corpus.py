"""Corpus preparation: self-contained segments, quality filters, exact and near deduplication.

The paper takes text under headers from web pages, keeps segments of 600 to 3,000 characters,
and drops repetitive and boilerplate text. Every removed segment is kept with its reason, so the
counts in ``stats.json`` add up.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from datasketch import MinHash, MinHashLSH

from pipeline.settings import CorpusSection

_MD_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S")
_UNDERLINE = re.compile(r"^\s*([=\-~^*\"#+`])\1{2,}\s*$")
_WORD = re.compile(r"\w+", re.UNICODE)
_BOILERPLATE = re.compile(
    r"cookie|privacy policy|terms of (use|service)|all rights reserved|sign up|log ?in\b|subscribe|"
    r"click here|read more|share (this|on)|follow us|newsletter|skip to (main )?content|copyright ©|©\s*\d{4}",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Segment:
    doc_id: str
    index: int
    heading: str
    text: str


def _split_sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) pairs: Markdown ``#`` headers and reST-style underlined titles."""
    lines = text.splitlines()
    sections: list[tuple[str, list[str]]] = [("", [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _MD_HEADER.match(line):
            sections.append((line.strip().lstrip("#").strip(), []))
        elif line.strip() and _UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()) * 0.6:
            sections.append((line.strip(), []))
            i += 1  # skip the underline
        elif _UNDERLINE.match(line) and not sections[-1][1]:
            pass  # overline of a reST title, or a stray rule at the start of a section
        else:
            sections[-1][1].append(line)
        i += 1
    return [(h, body) for h, body in sections if any(x.strip() for x in body)]


def _blocks(lines: list[str], max_chars: int) -> list[str]:
    """Blank-line separated blocks; a block longer than ``max_chars`` is split at its lines."""
    blocks: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    out: list[str] = []
    for block in blocks:
        if len(block) <= max_chars:
            out.append(block)
        else:
            out.extend(x for x in block.split("\n") if x.strip())
    return out


def segment_document(doc_id: str, text: str, max_chars: int) -> list[Segment]:
    """Split one document into segments: per section, consecutive blocks packed up to
    ``max_chars``. A single block longer than that stays whole (the length filter counts it)."""
    segments: list[Segment] = []
    for heading, body in _split_sections(text):
        packed: list[str] = []
        size = 0
        for block in _blocks(body, max_chars):
            if packed and size + 2 + len(block) > max_chars:
                segments.append(Segment(doc_id, len(segments), heading, "\n\n".join(packed)))
                packed, size = [], 0
            packed.append(block)
            size += len(block) + (2 if size else 0)
        if packed:
            segments.append(Segment(doc_id, len(segments), heading, "\n\n".join(packed)))
    return segments


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def duplicate_line_fraction(text: str) -> float:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return 0.0
    counts = Counter(lines)
    return sum(c for c in counts.values() if c > 1) / len(lines)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def top_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word characters covered by the most frequent n-gram (Gopher's measure)."""
    tokens = words(text)
    grams = _ngrams(tokens, n)
    total = sum(len(t) for t in tokens)
    if not grams or not total:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(t) for t in gram) / total


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Share of word characters inside n-grams that occur more than once."""
    tokens = words(text)
    grams = _ngrams(tokens, n)
    total = sum(len(t) for t in tokens)
    if not grams or not total:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(t) for t, c in zip(tokens, covered) if c) / total


def boilerplate_line_fraction(text: str) -> float:
    lines = [x for x in text.splitlines() if x.strip()]
    if not lines:
        return 0.0
    return sum(1 for x in lines if _BOILERPLATE.search(x)) / len(lines)


def filter_reason(text: str, cfg: CorpusSection) -> str | None:
    """The first quality filter that removes ``text``, or None if it passes all of them."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    if top_ngram_fraction(text) > cfg.max_top_ngram_fraction:
        return "top_ngram_repetition"
    if duplicate_ngram_fraction(text) > cfg.max_duplicate_ngram_fraction:
        return "duplicate_ngrams"
    if boilerplate_line_fraction(text) > cfg.max_boilerplate_line_fraction:
        return "boilerplate"
    return None


def _normalized(text: str) -> str:
    return " ".join(words(text))


def _minhash(text: str, num_perm: int) -> MinHash:
    tokens = words(text)
    shingles = {" ".join(g) for g in _ngrams(tokens, 5)} or {" ".join(tokens)}
    mh = MinHash(num_perm=num_perm, seed=1)
    mh.update_batch([s.encode() for s in shingles])
    return mh


def deduplicate(
    rows: list[dict[str, Any]], threshold: float, num_perm: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop exact duplicates (normalised text) and MinHash near duplicates; first one wins."""
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    exact: dict[str, str] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for row in rows:
        digest = hashlib.sha1(_normalized(row["text"]).encode()).hexdigest()
        if digest in exact:
            removed.append({**row, "reason": "exact_duplicate", "duplicate_of": exact[digest]})
            continue
        mh = _minhash(row["text"], num_perm)
        near = lsh.query(mh)
        if near:
            removed.append({**row, "reason": "near_duplicate", "duplicate_of": sorted(near)[0]})
            continue
        exact[digest] = row["segment_id"]
        lsh.insert(row["segment_id"], mh)
        kept.append(row)
    return kept, removed


def segment_rows(doc_id: str, text: str, cfg: CorpusSection) -> list[tuple[dict[str, Any], str | None]]:
    """One document's segments as corpus rows, each with the filter that removes it (or None)."""
    out = []
    for seg in segment_document(doc_id, text, cfg.max_chars):
        row = {"segment_id": f"{seg.doc_id}#{seg.index}", "heading": seg.heading, "text": seg.text}
        out.append((row, filter_reason(seg.text, cfg)))
    return out


def prepare_corpus(
    documents: Iterable[dict[str, Any]], cfg: CorpusSection, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Segments that pass every filter, the removed ones with reasons, and counts.

    ``cfg.executor`` says who does the work: this process (``builtin``), or datatrove's pipeline
    blocks and executors (``datatrove``, :mod:`pipeline.corpus_datatrove`)."""
    if cfg.executor == "datatrove":
        from pipeline.corpus_datatrove import prepare_corpus_datatrove

        return prepare_corpus_datatrove(documents, cfg, seed)
    candidates: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    n_docs = 0
    for doc in documents:
        n_docs += 1
        for row, reason in segment_rows(doc["doc_id"], doc["text"], cfg):
            if reason:
                removed.append({**row, "reason": reason})
            else:
                candidates.append(row)
    n_segments = len(candidates) + len(removed)
    kept, dups = deduplicate(candidates, cfg.minhash_threshold, cfg.minhash_num_perm)
    removed.extend(dups)
    return finish(kept, removed, n_docs, n_segments, cfg, seed)


def finish(kept: list[dict[str, Any]], removed: list[dict[str, Any]], n_docs: int, n_segments: int,
           cfg: CorpusSection, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The seeded sample down to ``max_segments`` (the rest ``sampled_out``), and the counts."""
    if cfg.max_segments is not None and len(kept) > cfg.max_segments:
        rng = random.Random(seed)
        chosen = set(rng.sample(range(len(kept)), cfg.max_segments))
        for i, row in enumerate(kept):
            if i not in chosen:
                removed.append({**row, "reason": "sampled_out"})
        kept = [row for i, row in enumerate(kept) if i in chosen]
    reasons = Counter(r["reason"] for r in removed)
    assert len(kept) + len(removed) == n_segments, "every segment is either kept or removed with a reason"
    lengths = [len(r["text"]) for r in kept]
    stats = {
        "documents": n_docs,
        "segments": n_segments,
        "kept": len(kept),
        "removed": dict(sorted(reasons.items())),
        "kept_chars_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
    }
    return kept, removed, stats


RUNTIME_SETTINGS = ("datatrove_executor", "datatrove_tasks", "datatrove_workers", "datatrove_dir", "datatrove_options")
"""Where and in how many tasks datatrove runs: they do not change which segments are kept."""


def cache_settings(cfg: CorpusSection) -> dict[str, Any]:
    """The section's settings for the corpus stage's cache key: ``executor`` only when it is not
    ``builtin`` (so corpora cached before it existed stay cached), and none of the settings that
    say only where datatrove runs (:data:`RUNTIME_SETTINGS`)."""
    dump = cfg.model_dump()
    if dump["executor"] == "builtin":
        del dump["executor"]
    return {k: v for k, v in dump.items() if k not in RUNTIME_SETTINGS}
