"""The evaluation data that ships inside the package, and how ``eval.data_dir`` finds files.

``evals/data/`` holds the AlpacaEval instructions with two reference outputs, IFEval's prompts,
TruthfulQA v1 (multiple choice), GSM8K (test, and train for few-shot examples) and the LLMBar
human-labelled answer pairs, each gzip-compressed; ``evals/data/SOURCES.md`` gives every file's
origin, commit, license and sha256. ``eval.data_dir: packaged`` (the default) reads them, so a
fresh install evaluates offline with nothing beside it.

Any other folder laid out the same way (``alpaca_eval/``, ``heldout/``, ``preferences/``) may be
named instead; each file may be plain or ``.gz``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED = "packaged"
"""The ``eval.data_dir`` value that names the data shipped in ``evals/data/``."""


def packaged_dir() -> Path:
    """The folder of the shipped evaluation data (a real directory: the package is installed
    from files, editable or as a wheel, never from a zip)."""
    return Path(str(resources.files("evals") / "data"))


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """``eval.data_dir`` as a folder: ``packaged`` is the shipped data, None stays None (no local
    data: everything comes from the hub), anything else is a path (``~`` expanded)."""
    if data_dir is None:
        return None
    if str(data_dir) == PACKAGED:
        return packaged_dir()
    return Path(data_dir).expanduser()


def data_file(root: str | Path, rel: str) -> Path:
    """``root/rel``, or ``root/rel.gz`` when only the compressed file exists. Returns the plain
    name when neither exists, so that error messages name the file that was expected."""
    plain = Path(root) / rel
    if plain.is_file():
        return plain
    packed = plain.with_name(plain.name + ".gz")
    return packed if packed.is_file() else plain
