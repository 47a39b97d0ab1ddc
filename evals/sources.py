"""Where AlpacaEval's reference outputs come from: ``eval.data_dir`` or the Hugging Face hub.

The two named references exist in both places:

| reference | local file (under ``eval.data_dir``) | hub file (dataset ``tatsu-lab/alpaca_eval``) |
| --- | --- | --- |
| ``text_davinci_003`` (AlpacaEval 1) | ``alpaca_eval/reference_text_davinci_003.json`` | ``alpaca_eval.json`` |
| ``gpt4_turbo`` (AlpacaEval 2) | ``alpaca_eval/reference_gpt4_turbo.json`` | ``alpaca_eval_gpt4_baseline.json`` |

Each is a JSON list of the 805 AlpacaEval records in AlpacaEval's own order, so the seeded
subset of :func:`evals.alpaca.load_instruction_set` picks the same instructions from either.
Hub files are fetched with ``huggingface_hub.hf_hub_download`` (plain JSON files; the
dataset's loading script is never run) and land in the usual hub cache, so a second run reads
them offline. Another model's outputs file (a path, or a name under ``model_outputs/``) is
always local.

This module imports nothing heavy: the contamination check uses it before any evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evals import bundled
from pipeline.data import DataError

HUB_REPO = "tatsu-lab/alpaca_eval"
REFERENCES = {
    "text_davinci_003": "reference_text_davinci_003.json",  # AlpacaEval 1 baseline
    "gpt4_turbo": "reference_gpt4_turbo.json",  # AlpacaEval 2 baseline (gpt4_1106_preview)
}
HUB_FILES = {
    "text_davinci_003": "alpaca_eval.json",
    "gpt4_turbo": "alpaca_eval_gpt4_baseline.json",
}
SOURCES = ("auto", "local", "hub")
Source = Literal["auto", "local", "hub"]

_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})/")


class SourceError(DataError):
    """The reference outputs can be had from neither the local folder nor the hub; the message
    names what was tried and why each failed."""


@dataclass(frozen=True)
class ReferenceFile:
    """A resolved reference outputs file.

    Attributes:
        name: the reference's name (a key of :data:`REFERENCES`, or the file's stem).
        path: the file to read (in the hub cache for a hub file).
        origin: ``{"kind": "local", "path"}`` or ``{"kind": "hub", "repo_id", "filename",
            "revision", "commit"}`` (``commit``: the snapshot the cache holds, when known).
    """

    name: str
    path: Path
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.origin.get("kind", "local")


def alpaca_eval_dir(data_dir: str | Path) -> Path:
    """``data_dir/alpaca_eval`` when it exists (``packaged`` or a folder laid out like
    ``evals/data``), else ``data_dir`` itself."""
    root = bundled.resolve_data_dir(data_dir)
    return root / "alpaca_eval" if (root / "alpaca_eval").is_dir() else root


def local_reference_path(root: Path, reference: str) -> tuple[str, Path]:
    """The reference's name and its file under ``root`` (the ``alpaca_eval/`` folder).

    Raises:
        ValueError: ``reference`` is neither a named reference, a ``.json`` path, nor a model
            name in ``root/model_outputs``.
    """
    if reference in REFERENCES:
        return reference, bundled.data_file(root, REFERENCES[reference])
    path = Path(reference)
    if path.suffix == ".json":
        path = path if path.is_absolute() or path.exists() else root / path
        return path.stem, path
    named = bundled.data_file(root, f"model_outputs/{reference}.json")
    if named.is_file():
        return reference, named
    raise ValueError(
        f"reference {reference!r}: not one of {sorted(REFERENCES)}, a .json file, or a name in {root / 'model_outputs'}"
    )


def _local_candidate(data_dir: str | Path | None, reference: str) -> tuple[str, Path | None]:
    data_dir = bundled.resolve_data_dir(data_dir)
    if data_dir is None:
        if reference in REFERENCES:
            return reference, None
        path = Path(reference)
        if path.suffix == ".json":
            return path.stem, path
        raise ValueError(f"reference {reference!r}: a model name in model_outputs/ needs eval.data_dir")
    return local_reference_path(alpaca_eval_dir(data_dir), reference)


def planned_kind(data_dir: str | Path | None, reference: str, source: Source = "auto") -> str:
    """``local`` or ``hub``: where :func:`resolve_reference` will read from, decided from the
    file system alone (no download)."""
    _check_source(source)
    if reference not in HUB_FILES or source == "local":
        return "local"
    if source == "hub":
        return "hub"
    _, local = _local_candidate(data_dir, reference)
    return "local" if local is not None and local.is_file() else "hub"


def resolve_reference(
    data_dir: str | Path | None, reference: str = "text_davinci_003", source: Source = "local",
    revision: str | None = None,
) -> ReferenceFile:
    """The reference outputs file to read, downloading it from the hub if that is the source.

    Args:
        data_dir: ``packaged`` (the data shipped in ``evals/data``) or a folder laid out like it (or its ``alpaca_eval/`` folder); may be
            None or missing when the hub is the source.
        reference: ``text_davinci_003``, ``gpt4_turbo``, a path to another AlpacaEval outputs
            JSON, or a model name in ``model_outputs/`` (the last two are always local).
        source: ``local`` (the folder only), ``hub`` (the hub only), or ``auto`` (the folder
            when it has the file, else the hub).
        revision: hub revision (branch, tag or commit) of ``tatsu-lab/alpaca_eval``; None: main.

    Raises:
        SourceError: the file is not where ``source`` says to look, or the download failed;
            with ``auto``, the message names both the missing local file and the hub failure.
        ValueError: an unknown reference name.
    """
    _check_source(source)
    name, local = _local_candidate(data_dir, reference)
    if reference not in HUB_FILES:
        if source == "hub":
            raise SourceError(f"eval.alpaca_source=hub: the hub has only the references {sorted(HUB_FILES)}; "
                              f"{reference!r} is another model's outputs file and is read locally "
                              f"(use eval.alpaca_source=auto or local)")
        if local is None or not local.is_file():
            raise SourceError(f"AlpacaEval reference outputs not found: {local}")
        return ReferenceFile(name, local, {"kind": "local", "path": str(local)})
    local_missing = local is None or not local.is_file()
    if source == "local" or (source == "auto" and not local_missing):
        if local_missing:
            where = local if local is not None else (
                f"<eval.data_dir>/alpaca_eval/{REFERENCES[reference]} (eval.data_dir is unset)")
            raise SourceError(f"AlpacaEval reference outputs not found: {where} (eval.alpaca_source=local; "
                              f"set eval.alpaca_source=auto or hub to fetch {HUB_FILES[reference]} from the "
                              f"Hugging Face dataset {HUB_REPO})")
        return ReferenceFile(name, local, {"kind": "local", "path": str(local)})
    filename = HUB_FILES[reference]
    try:
        path = fetch_hub_file(filename, revision)
    except Exception as exc:  # offline, unknown revision, hub error: all are reported the same way
        at = "" if revision is None else f" at revision {revision!r}"
        failure = (f"downloading {filename} from the Hugging Face dataset {HUB_REPO}{at} failed: "
                   f"{type(exc).__name__}: {exc}")
        if source == "hub":
            raise SourceError(f"AlpacaEval reference {reference!r} (eval.alpaca_source=hub): {failure}") from exc
        local_text = str(local) if local is not None else "none (eval.data_dir is unset)"
        raise SourceError(
            f"AlpacaEval reference {reference!r} is available neither locally nor from the hub: "
            f"local file {local_text} does not exist, and {failure}. Put the file there, or run once "
            f"with internet access (the download is cached)") from exc
    origin = {"kind": "hub", "repo_id": HUB_REPO, "filename": filename, "revision": revision or "main",
              "commit": _snapshot_commit(path)}
    return ReferenceFile(name, path, origin)


def fetch_hub_file(filename: str, revision: str | None = None) -> Path:
    """One file of the hub dataset ``tatsu-lab/alpaca_eval`` (from the hub cache when there)."""
    import huggingface_hub  # looked up at call time, so tests can serve files without a network

    return Path(huggingface_hub.hf_hub_download(repo_id=HUB_REPO, filename=filename, repo_type="dataset",
                                                revision=revision))


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a hub-cache path (``.../snapshots/<commit>/<file>``), else None."""
    found = _SNAPSHOT.search(Path(path).as_posix())
    return found.group(1) if found else None


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown AlpacaEval source {source!r}; one of {', '.join(SOURCES)}")
