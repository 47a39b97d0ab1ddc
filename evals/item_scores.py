"""Per-item scores of one evaluation, read back from its folder (``<model>/eval/``), so that two
models' numbers can be compared item by item.

- ``alpaca_eval/win_rate``: per prompt, the judge's preference for the model's answer over the
  reference's in percent (0 lost, 50 tie or undecided between the orders, 100 won), from
  ``alpaca/annotations.json``; prompts the judge left unjudged are left out (and counted).
- ``alpaca_eval/avg_length``: per prompt, the answer's length in characters
  (``alpaca/model_outputs.jsonl``).
- held-out metrics (``<task>/<metric>``): per document, lm-eval's score in ``samples_<task>.jsonl``
  of ``heldout/`` or ``heldout_hub/``, matched to the reported name through its filter.

Metrics without per-item scores (the length-controlled win rate is a fitted model's output)
give None: a gate then falls back to an unpaired comparison and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.lm_eval_runner import metric_name


@dataclass(frozen=True)
class ItemScores:
    """One metric's per-item scores of one model."""

    metric: str
    values: dict[Any, float]
    bounds: tuple[float, float] | None
    """The range one item's score can take; None when unbounded (lengths)."""
    left_out: int = 0
    """Items present in the evaluation but without a score (an unjudged prompt)."""
    source: str = ""
    keys_checked: dict[Any, str] = field(default_factory=dict)
    """Per item, a digest of what was scored (lm-eval's ``doc_hash``), where the file has one:
    two evaluations pair only where these agree."""


def item_scores(eval_dir: str | Path, metric: str) -> ItemScores | None:
    """``metric``'s per-item scores in the evaluation folder ``eval_dir``; None when the folder
    holds none for it (a metric without items, or an evaluation made before they were kept)."""
    eval_dir = Path(eval_dir)
    if metric == "alpaca_eval/win_rate":
        return preferences(eval_dir / "alpaca" / "annotations.json", metric)
    if metric == "alpaca_eval/avg_length":
        return _lengths(eval_dir / "alpaca" / "model_outputs.jsonl", metric)
    if metric.startswith("alpaca_eval/"):
        return None
    task = metric.split("/", 1)[0]
    for folder in ("heldout", "heldout_hub"):
        path = eval_dir / folder / f"samples_{task}.jsonl"
        if path.is_file():
            return _lm_eval_samples(path, metric, task)
    return None


def preferences(path: Path, metric: str = "alpaca_eval/win_rate") -> ItemScores | None:
    """Per instruction, the preference for ``output_2`` (the evaluated model) in percent, from an
    annotations file written by :func:`evals.alpaca.score_alpaca_eval`."""
    if not path.is_file():
        return None
    rows = json.loads(path.read_text(encoding="utf-8"))
    values: dict[Any, float] = {}
    left_out = 0
    for row in rows:
        pref = row.get("preference")
        if not isinstance(pref, (int, float)) or isinstance(pref, bool) or math.isnan(pref):
            left_out += 1
            continue
        # alpaca_eval: 1 the first output (the reference) is better, 2 the second, 0 a draw
        values[row["instruction"]] = 50.0 if pref == 0 else round((float(pref) - 1.0) * 100.0, 6)
    return ItemScores(metric, values, (0.0, 100.0), left_out, str(path))


def _lengths(path: Path, metric: str) -> ItemScores | None:
    if not path.is_file():
        return None
    values = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                values[row["instruction"]] = float(len(row.get("output") or ""))
    return ItemScores(metric, values, None, 0, str(path))


def _lm_eval_samples(path: Path, metric: str, task: str) -> ItemScores | None:
    values: dict[Any, float] = {}
    hashes: dict[Any, str] = {}
    left_out = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            for key in row.get("metrics") or []:
                parsed = metric_name(task, f"{key},{row.get('filter', 'none')}")
                if parsed is None or parsed[0] != metric:
                    continue
                raw = row.get(key)
                if isinstance(raw, bool):
                    raw = float(raw)
                if not isinstance(raw, (int, float)) or math.isnan(raw):
                    left_out += 1
                    continue
                values[row["doc_id"]] = float(raw)
                hashes[row["doc_id"]] = str(row.get("doc_hash", ""))
    if not values and not left_out:
        return None
    bounded = all(0.0 <= v <= 1.0 for v in values.values())
    return ItemScores(metric, values, (0.0, 1.0) if bounded else None, left_out, str(path), hashes)
