"""Answer pairs whose better answer was labelled by someone outside this project.

Two kinds of label ship in ``evals/data/preferences/`` (see its ``SOURCES.md``):

* ``human``: LLMBar's Natural set (100 pairs) and its expert-majority MT-Bench set (200 pairs),
  each answer pair labelled by people;
* ``gpt4``: GPT-4's AlpacaEval 1 judgments of five models' answers against text_davinci_003 on
  the 805 AlpacaEval prompts (draws and unparsable judgments are left out and counted).

Every pair is a :class:`LabelledPair` with ``label`` 1 or 2 naming the better of ``output_1`` and
``output_2`` as the file stores them; judges see both orders, so the stored order never matters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evals.bundled import data_file, resolve_data_dir
from evals.tasks.utils import read_records

LLMBAR_FILES = {"llmbar_natural": "LLMBar_Natural.json", "llmbar_mtbench": "Processed_MT-Bench.json"}
GPT4_MODELS = ("text_davinci_001", "alpaca-7b", "falcon-40b-instruct", "vicuna-13b", "gpt4")
"""The five models GPT-4 judged against text_davinci_003, in order of their GPT-4 win rate."""
SOURCES = (*LLMBAR_FILES, "alpaca_eval_gpt4")
HUMAN_SOURCES = tuple(LLMBAR_FILES)


class CalibrationDataError(ValueError):
    """A labelled-pairs file is missing or holds a record that cannot be used; names file and record."""


@dataclass(frozen=True)
class LabelledPair:
    source: str
    """``llmbar_natural``, ``llmbar_mtbench`` or ``alpaca_eval_gpt4``."""
    pair_id: str
    """``<source>:<index in its file>`` (AlpacaEval: ``alpaca_eval_gpt4:<model>:<index>``)."""
    instruction: str
    output_1: str
    output_2: str
    label: int
    """1 or 2: the better output."""
    labeller: str
    """``human`` or ``gpt4``."""
    model: str | None = None
    """AlpacaEval only: the model that wrote ``output_2`` (``output_1`` is text_davinci_003's)."""

    @property
    def better(self) -> str:
        return self.output_1 if self.label == 1 else self.output_2

    @property
    def worse(self) -> str:
        return self.output_2 if self.label == 1 else self.output_1


def _text(path: Path, index: int, record: dict[str, Any], key: str, *, empty_ok: bool = True) -> str:
    """A string field; an answer may be empty (a model that wrote nothing was still judged)."""
    value = record.get(key)
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise CalibrationDataError(f"{path}: record {index}: field {key!r} is missing, not text or empty")
    return value


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CalibrationDataError(f"{path}: labelled pairs file not found (eval.data_dir must hold preferences/)")
    try:
        rows = read_records(path)
    except ValueError as exc:
        raise CalibrationDataError(f"{path}: {exc}") from exc
    return rows


def load_llmbar(data_dir: str | Path, source: str) -> list[LabelledPair]:
    path = data_file(resolve_data_dir(data_dir), f"preferences/llmbar/{LLMBAR_FILES[source]}")
    out = []
    for i, row in enumerate(_read(path)):
        label = row.get("label")
        if label not in (1, 2):
            raise CalibrationDataError(f"{path}: record {i}: label {label!r} is not 1 or 2")
        out.append(LabelledPair(source, f"{source}:{i}", _text(path, i, row, "input", empty_ok=False), _text(path, i, row, "output_1"),
                                _text(path, i, row, "output_2"), int(label), "human"))
    return out


def load_alpaca_gpt4(data_dir: str | Path, models: Sequence[str] = GPT4_MODELS) -> tuple[list[LabelledPair], dict[str, int]]:
    """GPT-4's decided judgments, and per model how many were draws or unparsable (left out)."""
    pairs, skipped = [], {}
    for model in models:
        path = data_file(resolve_data_dir(data_dir), f"preferences/alpaca_eval_gpt4/{model}.json")
        skipped[model] = 0
        for i, row in enumerate(_read(path)):
            try:
                pref = float(row.get("preference"))
            except (TypeError, ValueError):
                pref = None
            if pref not in (1.0, 2.0):
                skipped[model] += 1
                continue
            pairs.append(LabelledPair("alpaca_eval_gpt4", f"alpaca_eval_gpt4:{model}:{i}",
                                      _text(path, i, row, "instruction", empty_ok=False), _text(path, i, row, "output_1"),
                                      _text(path, i, row, "output_2"), int(pref), "gpt4", model))
    return pairs, skipped


def load_pairs(data_dir: str | Path, sources: Sequence[str] = SOURCES, n: int | None = None,
               seed: int = 0) -> list[LabelledPair]:
    """Labelled pairs from each source: all, or a seeded sample of ``n`` per source (AlpacaEval:
    ``n`` spread evenly over the five models, the same prompts for each model where possible)."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise CalibrationDataError(f"unknown labelled-pair sources {unknown}; known: {list(SOURCES)}")
    out: list[LabelledPair] = []
    for source in sources:
        if source == "alpaca_eval_gpt4":
            pairs, _ = load_alpaca_gpt4(data_dir)
            out += _sample_by_prompt(pairs, n, seed)
        else:
            pairs = load_llmbar(data_dir, source)
            out += pairs if n is None or n >= len(pairs) else random.Random(seed).sample(pairs, n)
    return out


def group_pairs(pairs: Sequence[LabelledPair]) -> dict[str, list[LabelledPair]]:
    """Pairs by source, plus ``human`` (every human-labelled pair) when more than one human
    source is present: the groups every calibration table reports."""
    groups: dict[str, list[LabelledPair]] = {}
    for pair in pairs:
        groups.setdefault(pair.source, []).append(pair)
    human = [p for p in pairs if p.labeller == "human"]
    if human and len({p.source for p in human}) > 1:
        groups["human"] = human
    return groups


def _sample_by_prompt(pairs: list[LabelledPair], n: int | None, seed: int) -> list[LabelledPair]:
    if n is None or n >= len(pairs):
        return pairs
    models = sorted({p.model for p in pairs})
    per_model = -(-n // len(models))
    prompts = sorted({p.pair_id.rsplit(":", 1)[1] for p in pairs}, key=int)
    order = {pid: rank for rank, pid in enumerate(random.Random(seed).sample(prompts, len(prompts)))}
    out = []
    for model in models:
        mine = sorted((p for p in pairs if p.model == model), key=lambda p: order[p.pair_id.rsplit(":", 1)[1]])
        out += mine[:per_model]
    return sorted(out, key=lambda p: (order[p.pair_id.rsplit(":", 1)[1]], p.model))[:n]
