"""Dataset loaders and metric hooks for the ``humpback_*`` lm-eval tasks.

The task YAMLs next to this file mirror lm-eval's built-in ``ifeval``, ``truthfulqa_mc1``,
``truthfulqa_mc2`` and ``gsm8k`` tasks, but read local files (the copies shipped in ``evals/data/``, or
another folder laid out the same way) instead of the Hugging Face hub. lm-eval calls a task's
``custom_dataset`` with the task's metadata and ``dataset_kwargs`` as keyword arguments, so
every loader takes ``**_`` for the keys it does not use.

Scoring is never rewritten here: the metric hooks hand over to lm-eval's own functions. They
exist only so that NLTK is pointed at packaged data before lm-eval's IFEval code is imported,
because that import calls ``nltk.download`` when the sentence tokenizer data is missing.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets

from pipeline.io import read_text

# A distribution on PyPI that ships NLTK's punkt_tab data as plain files (no pickles), found
# through its metadata so the package itself is never imported (it is installed --no-deps).
NLTK_DATA_DISTRIBUTION = "llama-index-core"
NLTK_DATA_MARKER = "nltk_cache/tokenizers/punkt_tab/english/collocations.tab"
NLTK_RESOURCE = "tokenizers/punkt_tab/english/"


class NltkDataError(RuntimeError):
    """NLTK's punkt_tab sentence tokenizer data cannot be found offline."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file (one JSON object a line) or a ``.json`` list, either of them
    possibly gzip-compressed (``.gz``)."""
    path = Path(path)
    text = read_text(path)
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return rows


def truthfulqa_record(row: dict[str, Any]) -> dict[str, Any]:
    """A v1 ``mc_task.json`` record in the hub's ``truthful_qa/multiple_choice`` shape.

    The file maps each answer to its label (``{"answer": 1, ...}``); the hub dataset, which
    lm-eval's templates expect, holds ``{"choices": [...], "labels": [...]}`` in the same order
    (JSON objects keep their order, so the true MC1 answer stays first, as on the hub).
    """

    def targets(mapping: dict[str, int]) -> dict[str, list]:
        return {"choices": list(mapping), "labels": [int(v) for v in mapping.values()]}

    return {
        "question": row["question"],
        "mc1_targets": targets(row["mc1_targets"]),
        "mc2_targets": targets(row["mc2_targets"]),
    }


def load_ifeval(data_file: str, **_: Any) -> datasets.DatasetDict:
    """IFEval prompts (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) as a test split.

    Arrow fills every ``kwargs`` entry with all argument names (missing ones as None), exactly
    as in the hub's google/IFEval dataset; lm-eval's scorer drops the empty ones.
    """
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_records(data_file))})


def load_truthfulqa_mc(data_file: str, **_: Any) -> datasets.DatasetDict:
    """TruthfulQA v1 multiple-choice questions as the validation split (as on the hub)."""
    rows = [truthfulqa_record(r) for r in read_records(data_file)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def load_gsm8k(test_file: str, train_file: str, **_: Any) -> datasets.DatasetDict:
    """GSM8K ``question``/``answer`` pairs; train supplies the few-shot examples."""
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(read_records(test_file)),
            "train": datasets.Dataset.from_list(read_records(train_file)),
        }
    )


def packaged_nltk_data() -> Path | None:
    """The NLTK data folder shipped inside :data:`NLTK_DATA_DISTRIBUTION`, if installed."""
    try:
        files = metadata.files(NLTK_DATA_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.as_posix().endswith(NLTK_DATA_MARKER):
            # .../nltk_cache/tokenizers/punkt_tab/english/collocations.tab -> .../nltk_cache
            return Path(entry.locate()).parents[3]
    return None


def configure_nltk() -> Path:
    """Point NLTK at punkt_tab data without downloading anything; return the folder used.

    A folder in ``NLTK_DATA`` or NLTK's default search path that already has the data wins
    (a user's own setup); otherwise the packaged copy is put first on ``nltk.data.path``.

    Raises:
        NltkDataError: neither has the data; the message says what to install.
    """
    import nltk

    try:
        pointer = nltk.data.find(NLTK_RESOURCE)
        # .../<nltk data folder>/tokenizers/punkt_tab/english
        return Path(getattr(pointer, "path", str(pointer))).parents[2]
    except LookupError:
        pass
    folder = packaged_nltk_data()
    if folder is None or not (folder / NLTK_RESOURCE).is_dir():
        raise NltkDataError(
            "IFEval scoring needs NLTK's punkt_tab data and this machine is offline: "
            f"pip install --no-deps {NLTK_DATA_DISTRIBUTION} (it ships the data files), "
            "or point NLTK_DATA at a folder holding tokenizers/punkt_tab"
        )
    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    return folder


@cache
def _ifeval() -> ModuleType:
    """lm-eval's IFEval scoring module, imported only once NLTK has its data."""
    configure_nltk()
    import langdetect

    # langdetect is randomised; a fixed seed makes the language checks repeatable.
    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils as ifeval_utils

    return ifeval_utils


def ifeval_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval's ``ifeval`` ``process_results``: strict and loose following per prompt."""
    return _ifeval().process_results(doc, results)


def ifeval_agg_inst_level_acc(items: list[list[bool]]) -> float:
    """lm-eval's instruction-level accuracy: the share of all instructions followed."""
    return _ifeval().agg_inst_level_acc(items)


def truthfulqa_process_results_mc2(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's ``truthfulqa_mc2`` scoring: normalised probability mass on the true answers."""
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    return process_results_mc2(doc, results)
