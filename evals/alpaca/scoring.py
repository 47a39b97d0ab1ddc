"""Scoring: alpaca_eval's ``PairwiseAnnotator`` judges every pair of answers (each judgment
cached on disk, so a rerun re-judges nothing) and alpaca_eval's metrics turn the preferences into
a win rate, its standard error and a length-controlled win rate (:mod:`evals.alpaca.length_control`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from evals.alpaca.instructions import RECORD_FIELDS, InstructionSet, read_records
from evals.alpaca.judge import LOCAL_JUDGE, Judge, cache_path, cached_keys
from evals.alpaca.judge_view import guard_records
from evals.alpaca.length_control import LC_NOTES, length_controlled_metrics
from evals.alpaca.win_rate import win_rate_metrics
from pipeline.digests import settings_digest
from pipeline.io import write_json_atomic


def _check_outputs(model_outputs: Sequence[dict[str, Any]], reference_outputs: Sequence[dict[str, Any]]) -> None:
    model_instructions = [r["instruction"] for r in model_outputs]
    reference_instructions = [r["instruction"] for r in reference_outputs]
    if len(set(model_instructions)) != len(model_instructions):
        raise ValueError("model outputs repeat an instruction")
    if set(model_instructions) != set(reference_instructions):
        missing = set(reference_instructions) - set(model_instructions)
        extra = set(model_instructions) - set(reference_instructions)
        raise ValueError(f"model and reference outputs differ: {len(missing)} instruction(s) without a model "
                         f"output, {len(extra)} not in the reference")



def _records(outputs: Sequence[dict[str, Any]], default_generator: str) -> pd.DataFrame:
    df = pd.DataFrame([{k: r.get(k, "") for k in RECORD_FIELDS} for r in outputs])
    df["generator"] = df["generator"].replace("", default_generator)
    return df


def score_alpaca_eval(
    model_outputs: Sequence[dict[str, Any]] | str | Path,
    reference_outputs: InstructionSet | Sequence[dict[str, Any]] | str | Path,
    out_dir: str | Path,
    *,
    annotators_config: str = LOCAL_JUDGE,
    judge_model: str | None = None,
    judge: Judge | None = None,
    lc_data_dir: str | Path | None = None,
    chunksize: int = 32,
    cache_dir: str | Path | None = None,
    lc_download: bool = False,
    lc_glm: str = "auto",
    both_orders: bool = True,
) -> dict[str, Any]:
    """Judge the model's outputs against the reference's with alpaca_eval and score them.

    Every judgment is cached in ``out_dir/judge_cache/`` (one file per judge identity, through
    alpaca_eval's ``caching_path``), written after every ``chunksize`` pairs: a rerun, or an
    interrupted run resumed, judges only what is not there yet.

    Args:
        model_outputs: AlpacaEval records of the evaluated model, or a JSON file of them.
        reference_outputs: an :class:`InstructionSet` (its provenance is recorded), records, or a
            JSON file; the same instructions as ``model_outputs``.
        out_dir: where the cache, ``annotations.json`` and ``alpaca_eval.json`` go.
        annotators_config: the judge config (see :class:`Judge`); the local judge by default.
        judge_model: the judge model for local configs.
        judge: a :class:`Judge` already set up (its engine is reused); overrides the two above.
        lc_data_dir: where alpaca_eval's length-controlled GLM files are, if not in the hub cache.
        chunksize: pairs judged between two writes of the cache.
        lc_download: let alpaca_eval fetch its length-controlled GLM files from the hub.
        lc_glm: which length-controlled GLM (see :func:`length_controlled_metrics`).
        cache_dir: where the judge cache lives, if not in ``out_dir`` (a run keeps one cache for
            all its evaluations, so re-evaluating a model re-judges nothing already judged).
        both_orders: judge every pair twice, the reference shown first and then second, and
            average the two preferences (a judge that favours a position favours both answers
            equally often, so its bias cancels); False: alpaca_eval's single judgment in a
            random order. A symmetric judge (``Judge.is_symmetric``: the pointwise rubric
            judge) is always asked once, reference first: its other order is the mirror image.

    Returns:
        ``win_rate`` and ``standard_error`` (percent), ``discrete_win_rate``, counts, ``n``,
        ``length_controlled_win_rate``, ``lc_standard_error`` and ``lc_glm`` (or None and
        ``lc_unavailable_reason``), ``judged_now``, ``reused_from_cache``, ``planted`` (how many
        model and reference outputs carried planted judge-addressed text, which the judge was not
        shown; :mod:`evals.alpaca.judge_view`) and ``provenance``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = judge or Judge(annotators_config, judge_model)
    instruction_set = reference_outputs if isinstance(reference_outputs, InstructionSet) else None
    reference_records = _read_outputs(instruction_set.reference if instruction_set is not None else reference_outputs)
    model_records = _read_outputs(model_outputs)
    _check_outputs(model_records, reference_records)
    avg_length = int(sum(len(str(r.get("output", ""))) for r in model_records) / len(model_records)) if model_records else 0
    # The judge sees each answer without planted judge-addressed text (evals/alpaca/judge_view.py).
    model_records, model_planted = guard_records(model_records)
    reference_records, reference_planted = guard_records(reference_records)
    reference_df = _records(reference_records, "reference")
    model_df = _records(model_records, "model")

    symmetric = judge.is_symmetric()
    if symmetric:  # its second order would mirror the first exactly: judge once, reference first
        both_orders = False
    annotator = judge.annotator(cache_path(Path(cache_dir) if cache_dir else out_dir, judge, "score"),
                                **({"is_randomize_output_order": False} if both_orders or symmetric else {}))
    cached = cached_keys(annotator)
    pairs = pd.merge(reference_df, model_df, on="instruction", suffixes=("_1", "_2"))
    keys = list(zip(pairs["instruction"], pairs["output_1"], pairs["output_2"]))
    if both_orders:
        keys += [(i, o2, o1) for i, o1, o2 in keys]
    reused = sum(key in cached for key in keys)
    start = time.perf_counter()
    annotations = pd.DataFrame(annotator.annotate_head2head(outputs_1=reference_df, outputs_2=model_df, chunksize=chunksize))
    if both_orders:
        swapped = pd.DataFrame(annotator.annotate_head2head(outputs_1=model_df, outputs_2=reference_df, chunksize=chunksize))
        annotations = _average_orders(annotations, swapped)
    seconds = time.perf_counter() - start

    result: dict[str, Any] = win_rate_metrics(annotations)
    result["n_missing"] = int(annotations["preference"].isna().sum())
    order = {r["instruction"]: i for i, r in enumerate(reference_records)}
    annotations = annotations.sort_values("instruction", key=lambda s: s.map(order)).reset_index(drop=True)
    indices = _alpaca_indices(instruction_set, reference_records)
    result.update(length_controlled_metrics(annotations, indices, lc_data_dir, lc_download, lc_glm))
    result.update(
        avg_length=avg_length,
        planted={"model_outputs": model_planted, "reference_outputs": reference_planted},
        judged_now=len(keys) - reused,
        orders="both" if both_orders else ("one (symmetric judge)" if symmetric else "random"),
        reused_from_cache=reused,
        seconds=round(seconds, 3),
    )
    generators = sorted(set(model_df["generator"]))
    result["provenance"] = {
        **judge.provenance(),
        **_reference_provenance(instruction_set, reference_df),
        "generator": generators[0] if len(generators) == 1 else generators,
        "model_outputs_digest": settings_digest(model_records),
        "caching_path": str(annotator.caching_path),
        "lc_note": LC_NOTES.get(result.get("lc_glm") or "", None),
    }
    annotations.to_json(out_dir / "annotations.json", orient="records", indent=2)
    write_json_atomic(out_dir / "alpaca_eval.json", result)
    return result


def _average_orders(stored: pd.DataFrame, swapped: pd.DataFrame) -> pd.DataFrame:
    """``stored`` (reference as output_1) with each preference replaced by the mean of its own and
    the swapped judgment's, turned to the same orientation (1: reference better, 2: model
    better); missing when either judgment is missing. Both raw preferences are kept."""
    other = swapped.set_index("instruction")["preference"].astype(float)
    out = stored.copy()
    out["preference_reference_first"] = out["preference"].astype(float)
    out["preference_reference_second"] = 3.0 - out["instruction"].map(other)
    out["preference"] = (out["preference_reference_first"] + out["preference_reference_second"]) / 2
    return out


def _read_outputs(outputs: Sequence[dict[str, Any]] | str | Path) -> list[dict[str, Any]]:
    """AlpacaEval records given as such or as a JSON file of them."""
    return read_records(outputs) if isinstance(outputs, (str, Path)) else list(outputs)


def _alpaca_indices(instruction_set: InstructionSet | None, reference_records: Sequence[dict[str, Any]]) -> list[int] | None:
    """Each instruction's position in the full AlpacaEval set, where it is known."""
    if instruction_set is not None:
        return instruction_set.indices
    if len(reference_records) == 805:
        return list(range(805))  # the full set, in AlpacaEval's order
    return None


def _reference_provenance(instruction_set: InstructionSet | None, reference_df: pd.DataFrame) -> dict[str, Any]:
    """The instruction set's provenance, or what is known of reference records given as such."""
    if instruction_set is not None:
        return instruction_set.provenance()
    return {"reference": sorted(set(reference_df["generator"])), "subset_size": None, "subset_seed": None,
            "n_instructions": len(reference_df)}
