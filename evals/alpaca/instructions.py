"""The AlpacaEval instructions: a seeded, reproducible subset of the 805, with the reference
model's answers to exactly those instructions.

The reference file is read from a local folder or from the hub dataset ``tatsu-lab/alpaca_eval``
(:mod:`evals.sources`); every AlpacaEval file lists the instructions in the same order, so a
seed picks the same subset whatever the reference and wherever it was read from.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from evals import sources
from evals.sources import REFERENCES  # noqa: F401 (re-exported: the named references)
from pipeline.digests import settings_digest
from pipeline.io import content_digest, read_text

RECORD_FIELDS = ("instruction", "output", "generator", "dataset")
"""The fields of an AlpacaEval record, the format of every outputs file."""

@dataclass(frozen=True)
class InstructionSet:
    """A reproducible subset of the AlpacaEval instructions and the reference's answers to it.

    Attributes:
        instructions: ``{"instruction", "dataset", "index"}`` per item, ``index`` being the
            position in the full AlpacaEval set (every AlpacaEval file has the same order).
        reference: the reference model's AlpacaEval records for the same items, same order.
        reference_name: a key of :data:`REFERENCES`, or the file's stem for another file.
        reference_path: the file the reference records were read from.
        subset_size: the size asked for (None: all).
        seed: the seed that drew the subset.
        source: where the reference file came from (:attr:`evals.sources.ReferenceFile.origin`):
            ``{"kind": "local", "path"}`` or ``{"kind": "hub", "repo_id", "filename", "revision",
            "commit"}``.
    """

    instructions: list[dict[str, Any]]
    reference: list[dict[str, Any]]
    reference_name: str
    reference_path: str
    subset_size: int | None
    seed: int
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})

    @property
    def indices(self) -> list[int]:
        return [r["index"] for r in self.instructions]

    def select(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of another AlpacaEval outputs file for this set's instructions, in order.

        Raises:
            ValueError: when ``records`` lacks one of the instructions.
        """
        by_instruction = {r["instruction"]: r for r in records}
        missing = [r["instruction"] for r in self.instructions if r["instruction"] not in by_instruction]
        if missing:
            raise ValueError(f"{len(missing)} instruction(s) of the set have no record, e.g. {missing[0][:80]!r}")
        return [by_instruction[r["instruction"]] for r in self.instructions]

    def provenance(self) -> dict[str, Any]:
        """What the set is, with the reference file identified by content and by origin:
        ``reference_source`` is ``local`` or ``hub``; a hub file adds ``reference_hub``
        (repo, filename, revision asked for and the snapshot commit, when known)."""
        hub = None
        if self.source.get("kind") == "hub":
            hub = {k: self.source.get(k) for k in ("repo_id", "filename", "revision", "commit")}
        return {
            "reference": self.reference_name,
            "reference_sha256": content_digest(self.reference_path),
            "reference_source": self.source.get("kind", "local"),
            "reference_hub": hub,
            "subset_size": self.subset_size,
            "subset_seed": self.seed,
            "n_instructions": len(self.instructions),
            "indices_digest": settings_digest(self.indices),
        }


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """AlpacaEval records from a JSON list, checked for the fields scoring needs."""
    records = json.loads(read_text(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of AlpacaEval records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ValueError(f"{path}: record {i} lacks a string 'instruction' or 'output'")
    return records


def load_instruction_set(
    data_dir: str | Path | None, reference: str = "text_davinci_003", subset_size: int | None = None, seed: int = 0,
    *, source: sources.Source = "local", hub_revision: str | None = None,
) -> InstructionSet:
    """A seeded subset of the AlpacaEval instructions with the reference's answers to them.

    Args:
        data_dir: the shared data directory or its ``alpaca_eval/`` folder (may be None or
            missing when the reference comes from the hub).
        reference: ``text_davinci_003`` (AlpacaEval 1), ``gpt4_turbo`` (AlpacaEval 2), a path to
            another AlpacaEval outputs JSON, or the name of one in ``model_outputs/``.
        subset_size: how many instructions; None (or at least the set's size) keeps all.
        seed: draws the subset; the same seed gives the same subset whatever the reference and
            wherever it was read from, because every AlpacaEval file lists the instructions in
            the same order.
        source: ``local``, ``hub`` (the Hugging Face dataset tatsu-lab/alpaca_eval) or ``auto``
            (local when ``data_dir`` has the file, else the hub); see :mod:`evals.sources`.
        hub_revision: the hub dataset's revision (None: main).

    Returns:
        The subset, in the set's original order.

    Raises:
        evals.sources.SourceError: the reference file can be had from neither place.
    """
    resolved = sources.resolve_reference(data_dir, reference, source, hub_revision)
    name, path = resolved.name, resolved.path
    records = read_records(path)
    if len({r["instruction"] for r in records}) != len(records):
        raise ValueError(f"{path}: instructions are not unique")
    if subset_size is not None and subset_size < 1:
        raise ValueError(f"subset_size must be at least 1, got {subset_size}")
    indices = list(range(len(records)))
    if subset_size is not None and subset_size < len(records):
        indices = sorted(random.Random(seed).sample(indices, subset_size))
    instructions = [
        {"instruction": records[i]["instruction"], "dataset": records[i].get("dataset", ""), "index": i} for i in indices
    ]
    reference_records = [{k: records[i].get(k, "") for k in RECORD_FIELDS} for i in indices]
    return InstructionSet(instructions, reference_records, name, str(path), subset_size, seed, dict(resolved.origin))

