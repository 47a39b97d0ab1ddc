"""Data-quality metrics for the pairs an iteration trains on.

The paper's Table 2 reports instruction and response lengths (mean and standard deviation, in
characters); we add lexical diversity (distinct-n), a near-duplicate rate among instructions,
contamination against evaluation prompts, and the curator's precision and recall on 40 pairs
written and labelled for this project: a smoke test of the curator only, not comparable with the
paper's Table 7 (GPT-4 labels on real candidates). The curator's measurement against outside
labels is :mod:`evals.calibration.curator_eval`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH

from pipeline.corpus import words

CONTAMINATION_N = 8


def length_stats(texts: Sequence[str]) -> dict[str, float | None]:
    lengths = [len(t) for t in texts]
    if not lengths:
        return {"mean": None, "std": None}
    return {"mean": round(statistics.fmean(lengths), 1),
            "std": round(statistics.pstdev(lengths), 1) if len(lengths) > 1 else 0.0}


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams over all word n-grams across ``texts`` (Li et al. 2016)."""
    grams = [tuple(w[i : i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def near_duplicate_rate(texts: Sequence[str], threshold: float = 0.7, num_perm: int = 64) -> float | None:
    """Share of texts that are a MinHash near duplicate (word 3-gram shingles) of an earlier one."""
    if not texts:
        return None
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dups = 0
    for i, text in enumerate(texts):
        tokens = words(text)
        shingles = {" ".join(tokens[j : j + 3]) for j in range(max(1, len(tokens) - 2))}
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch([s.encode() for s in shingles])
        if lsh.query(mh):
            dups += 1
        else:
            lsh.insert(str(i), mh)
    return round(dups / len(texts), 4)


def pair_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    instructions = [r["instruction"] for r in rows]
    responses = [r["response"] for r in rows]
    return {
        "pairs": len(rows),
        "instruction_chars": length_stats(instructions),
        "response_chars": length_stats(responses),
        "instruction_distinct_1": distinct_n(instructions, 1),
        "instruction_distinct_2": distinct_n(instructions, 2),
        "instruction_near_duplicate_rate": near_duplicate_rate(instructions),
    }


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class ContaminationIndex:
    """Word n-grams of every evaluation prompt, by evaluation set, for overlap checks."""

    def __init__(self, prompt_sets: dict[str, Iterable[str]], n: int = CONTAMINATION_N):
        self.n = n
        self.index: dict[tuple[str, ...], set[str]] = {}
        self.sizes: dict[str, int] = {}
        for name, prompts in prompt_sets.items():
            count = 0
            for prompt in prompts:
                count += 1
                for gram in _ngrams(prompt, n):
                    self.index.setdefault(gram, set()).add(name)
            self.sizes[name] = count

    def match(self, text: str) -> list[str]:
        """Evaluation sets sharing at least one word n-gram with ``text``."""
        hits: set[str] = set()
        for gram in _ngrams(text, self.n):
            hits |= self.index.get(gram, set())
        return sorted(hits)

    def flag(self, rows: Sequence[dict[str, Any]], fields: Sequence[str] = ("instruction",)) -> list[dict[str, Any]]:
        """One entry per contaminated row: its position, id and the evaluation sets it overlaps."""
        flagged = []
        for i, row in enumerate(rows):
            hits = sorted({s for f in fields for s in self.match(row.get(f, ""))})
            if hits:
                flagged.append({"index": i, "id": row.get("segment_id", row.get("origin")), "eval_sets": hits})
        return flagged


EVAL_PROMPT_FILES = {
    # name: (path under the eval data dir, field or CSV column holding the prompt)
    "alpaca_eval": ("alpaca_eval/reference_text_davinci_003.json", "instruction"),
    "ifeval": ("heldout/ifeval/input_data.jsonl", "prompt"),
    "truthfulqa": ("heldout/truthfulqa/v1/mc_task.json", "question"),
    "gsm8k": ("heldout/gsm8k/test.jsonl", "question"),
}


def read_prompts(path: str | Path, field: str) -> list[str]:
    """The string values of ``field`` in every record of a JSON/JSONL/CSV file."""
    from pipeline.data import Record, read_source

    return [r.data[field] for r in read_source(str(path))
            if isinstance(r, Record) and isinstance(r.data.get(field), str)]


@dataclass
class EvalPromptSets:
    """The evaluation prompts the contamination check indexes, and what it cannot check.

    Attributes:
        found: set name -> prompts.
        fingerprints: set name -> sha256 of the file its prompts were read from.
        origins: set name -> ``local:<path>`` or ``hub:<repo>/<file>``.
        not_checked: set name -> why it is not checked (a missing file, a failed download, or an
            lm-eval hub task, ``lm_eval:<task>``, whose prompts are not indexed).
    """

    found: dict[str, list[str]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    not_checked: dict[str, str] = field(default_factory=dict)


HUB_TASK_NOT_INDEXED = ("lm-eval stock task with data from the Hugging Face hub: its prompts are not indexed "
                        "by the contamination check")


def collect_eval_prompt_sets(
    data_dir: str | Path | None,
    *,
    alpaca_source: str = "local",
    alpaca_reference: str = "text_davinci_003",
    hub_revision: str | None = None,
    hub_tasks: Sequence[str] = (),
) -> EvalPromptSets:
    """The evaluation prompts from wherever evaluation will read them.

    Local sets come from ``data_dir`` (:data:`EVAL_PROMPT_FILES`). AlpacaEval's 805 instructions
    come from the same place as the evaluation's reference outputs (``alpaca_source``, see
    :mod:`evals.sources`): the hub file when the hub is the source (downloaded here if not yet in
    the hub cache); if that fails and there is no local copy, AlpacaEval is listed as not
    checked with the hub error. Hub held-out tasks (``hub_tasks``) are always listed as not
    checked.
    """
    from evals import bundled, sources
    from pipeline.data import source_fingerprint

    out = EvalPromptSets()
    root = bundled.resolve_data_dir(data_dir)
    for name, (rel, column) in EVAL_PROMPT_FILES.items():
        if root is None:
            out.not_checked[name] = "eval.data_dir is unset"
            continue
        path = bundled.data_file(root, rel)
        if not path.is_file():
            out.not_checked[name] = f"{path} not found"
            continue
        out.found[name] = read_prompts(path, column)
        out.fingerprints[name] = source_fingerprint(str(path))
        out.origins[name] = f"local:{path}"
    if alpaca_source == "hub" or (alpaca_source == "auto" and "alpaca_eval" in out.not_checked):
        # Any named reference lists the same instructions; another model's file is local only.
        reference = alpaca_reference if alpaca_reference in sources.HUB_FILES else "text_davinci_003"
        try:
            ref = sources.resolve_reference(data_dir, reference, alpaca_source, hub_revision)
        except sources.SourceError as exc:
            if "alpaca_eval" not in out.found:  # a local copy holds the same instructions
                out.not_checked["alpaca_eval"] = str(exc)
        else:
            out.found["alpaca_eval"] = read_prompts(ref.path, EVAL_PROMPT_FILES["alpaca_eval"][1])
            out.fingerprints["alpaca_eval"] = source_fingerprint(str(ref.path))
            out.origins["alpaca_eval"] = (f"hub:{ref.origin['repo_id']}/{ref.origin['filename']}" if ref.kind == "hub"
                                          else f"local:{ref.path}")
            out.not_checked.pop("alpaca_eval", None)
    for task in hub_tasks:
        out.not_checked[f"lm_eval:{task}"] = HUB_TASK_NOT_INDEXED
    return out


def load_labelled_pairs(name: str = "curation_labelled_v1.jsonl", n: int | None = None) -> list[dict[str, Any]]:
    """The project-written labelled pairs (a smoke test of the curator, not an outside measure);
    ``n``: at most ``n // 2`` of each label, in file order (None: all)."""
    ref = resources.files("evals") / "resources" / name
    rows = [json.loads(line) for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is None:
        return rows
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row["label"], 0) < n // 2:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            out.append(row)
    return out


def curator_precision_recall(labels: Sequence[str], scores: Sequence[float | None], k: float) -> dict[str, Any]:
    """Treat "score >= k" as the curator saying "good"; unscored counts as "not good"."""
    predicted = [s is not None and s >= k for s in scores]
    actual = [label == "good" for label in labels]
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    return {
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "n": len(labels),
        "predicted_good": tp + fp,
        "unscored": sum(s is None for s in scores),
        "k": k,
    }
