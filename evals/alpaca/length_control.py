"""The length-controlled win rate: alpaca_eval's own GLMs, with their hub files read offline.

alpaca_eval 2's ``length_controlled_v1`` GLM is used where its hub data (``df_gamed.csv``) can be
had from a local directory or the local hub cache (:func:`_hub_files_offline`: nothing here
downloads unless asked to); otherwise alpaca_eval's ``length_controlled_minimal`` GLM, which needs
nothing but the annotations, is fit on them (:func:`_minimal_lc`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from evals.alpaca.library import ae_metrics
from evals.alpaca.win_rate import plain_number

LC_GLMS = ("auto", "length_controlled_v1", "length_controlled_minimal")
LC_NOTES = {
    "length_controlled_v1": (
        "alpaca_eval's length-controlled GLM (length_controlled_v1) is fit together with annotations "
        "of gpt4_1106_preview by weighted_alpaca_eval_gpt4_turbo; it is comparable to the leaderboard "
        "only with that reference and judge"),
    "length_controlled_minimal": (
        "alpaca_eval's length_controlled_minimal GLM (a length term and the model's strength; no "
        "instruction difficulty, no regularization towards gamed baselines), fit on this model's "
        "annotations alone: it removes this judge's length preference between this model and the "
        "reference, but is not comparable with leaderboard LC numbers or with length_controlled_v1; "
        "its standard error comes from bootstrap refits over instructions"),
}
LC_BOOTSTRAP = 50
"""Refits behind the minimal GLM's standard error (its predictions are one constant per fit, so
the spread of predictions that length_controlled_v1 reports would be 0)."""


@contextlib.contextmanager
def _hub_files_offline(lc_data_dir: str | Path | None, allow_download: bool = False):
    """While active, alpaca_eval's GLM reads its hub files (``df_gamed.csv``,
    ``instruction_difficulty.csv`` of the dataset ``tatsu-lab/alpaca_eval``) from ``lc_data_dir``
    or the local hub cache, and never from the network; a missing file raises FileNotFoundError."""
    import alpaca_eval.metrics.glm_winrate as glm
    from huggingface_hub import try_to_load_from_cache

    def local_only(repo_id: str, filename: str, repo_type: str | None = None, **_: Any) -> str:
        if lc_data_dir is not None and (Path(lc_data_dir) / filename).is_file():
            return str(Path(lc_data_dir) / filename)
        cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
        if isinstance(cached, str):
            return cached
        if allow_download:
            return original(repo_id=repo_id, filename=filename, repo_type=repo_type)
        raise FileNotFoundError(
            f"{filename} of the {repo_type} {repo_id} (Hugging Face hub) is needed by alpaca_eval's "
            f"length-controlled GLM and is not available offline: put it in lc_data_dir"
        )

    original = glm.hf_hub_download
    glm.hf_hub_download = local_only
    try:
        yield
    finally:
        glm.hf_hub_download = original


def length_controlled_metrics(
    annotations: pd.DataFrame, indices: Sequence[int] | None, lc_data_dir: str | Path | None = None,
    allow_download: bool = False, glm: str = "auto", bootstrap: int = LC_BOOTSTRAP, seed: int = 0,
) -> dict[str, Any]:
    """alpaca_eval's length-controlled win rate, or None with the reason it cannot be had.

    Args:
        annotations: alpaca_eval's annotations (``preference``, ``output_1``, ``output_2``,
            ``generator_1``, ``generator_2``), one row per instruction.
        indices: each row's position in the full AlpacaEval set; length_controlled_v1 looks up
            each instruction's difficulty by it.
        lc_data_dir: a directory holding length_controlled_v1's hub files, if not in the hub cache.
        allow_download: fetch those files from the hub when neither place has them.
        glm: ``length_controlled_v1`` (alpaca_eval 2's, needs its hub files),
            ``length_controlled_minimal`` (needs nothing but the annotations), or ``auto``: v1
            where its files can be had, else minimal, with the reason v1 was not used.
        bootstrap: refits behind the minimal GLM's standard error.
        seed: draws the bootstrap samples.

    Returns:
        ``length_controlled_win_rate``, ``lc_standard_error`` (percent), ``lc_glm`` (the GLM
        used), ``lc_unavailable_reason`` (why there is no value, or why v1 was not used).
    """
    if glm not in LC_GLMS:
        raise ValueError(f"unknown length-controlled GLM {glm!r}; one of {', '.join(LC_GLMS)}")
    none = {"length_controlled_win_rate": None, "lc_standard_error": None, "lc_glm": None}
    df = annotations.copy()
    if indices is not None:
        df.index = pd.Index(list(indices))
    df = df[df["preference"].notna()]
    v1_reason = None
    if glm in ("auto", "length_controlled_v1"):
        if indices is None:
            v1_reason = "AlpacaEval indices of the instructions are unknown"
        else:
            try:
                return _v1_lc(df, lc_data_dir, allow_download)
            except FileNotFoundError as exc:
                v1_reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # alpaca_eval raises anything from sklearn's errors on tiny sets
                return {**none, "lc_unavailable_reason": f"{type(exc).__name__}: {exc}"}
        if glm == "length_controlled_v1":
            return {**none, "lc_unavailable_reason": v1_reason}
    try:
        value, stderr = _minimal_lc(df, bootstrap, seed)
    except Exception as exc:  # sklearn on too few or degenerate annotations
        reason = f"length_controlled_minimal: {type(exc).__name__}: {exc}"
        return {**none, "lc_unavailable_reason": "; ".join(r for r in (v1_reason, reason) if r)}
    return {
        "length_controlled_win_rate": plain_number(value),
        "lc_standard_error": plain_number(stderr),
        "lc_glm": "length_controlled_minimal",
        "lc_unavailable_reason": None if v1_reason is None else f"length_controlled_v1 not used: {v1_reason}",
    }


def _v1_lc(df: pd.DataFrame, lc_data_dir: str | Path | None, allow_download: bool) -> dict[str, Any]:
    """alpaca_eval 2's ``length_controlled_v1`` GLM on annotations indexed by their AlpacaEval
    positions; FileNotFoundError when its hub files cannot be had."""
    with _hub_files_offline(lc_data_dir, allow_download), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = ae_metrics.get_length_controlled_winrate(df, save_weights_dir=None, is_add_glm_preference_inplace=False)
    return {
        "length_controlled_win_rate": plain_number(raw["length_controlled_winrate"]),
        "lc_standard_error": plain_number(raw.get("lc_standard_error")),
        "lc_glm": "length_controlled_v1",
        "lc_unavailable_reason": None,
    }


@contextlib.contextmanager
def _c_output_silenced():
    """liblinear writes a warning straight to the process's stderr for every fold in which a hard
    0/1 preference leaves one class without weight; those lines say nothing about the result.
    (Python-level errors still raise as exceptions.)"""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _minimal_lc(df: pd.DataFrame, bootstrap: int, seed: int) -> tuple[float, float | None]:
    """alpaca_eval's ``length_controlled_minimal`` GLM on these annotations, fit by alpaca_eval's
    own design-matrix and cross-validated logistic-regression helpers, and predicted at zero
    length difference; its standard error is the spread of ``bootstrap`` refits on instructions
    drawn with replacement."""
    import numpy as np
    from alpaca_eval.metrics import glm_winrate as ae_glm

    info = ae_glm.GLM_INFO["length_controlled_minimal"]
    n_splits = info["kwargs"].get("n_splits", 5)
    if len(df) < n_splits:
        raise ValueError(f"{len(df)} judged pairs; the GLM's {n_splits}-fold cross-validation needs at least {n_splits}")
    # Same features as alpaca_eval's _get_featurized_data, without its hub-only difficulty column.
    delta = (df["output_1"].str.len() - df["output_2"].str.len()).astype(float).to_numpy()
    pref = (df["preference"].astype(float).replace({0.0: 1.5}) - 1).to_numpy()

    def fit(rows) -> float:
        d = delta[rows]
        spread = d.std(ddof=1)
        train = pd.DataFrame({"preference": pref[rows], "std_delta_len": d / spread if spread > 0 else 0.0,
                              "not_gamed_baseline": True})
        test = pd.DataFrame({"std_delta_len": [0.0], "not_gamed_baseline": [True]})
        xy, x_test = ae_glm.make_dmatrix_for_model(train, test, formula=info["formula"])
        with warnings.catch_warnings(), _c_output_silenced():
            warnings.simplefilter("ignore")
            model = ae_glm.fit_LogisticRegressionCV(xy, "preference", is_ytrue_proba=True, **info["kwargs"])
        return float(model.predict_proba(x_test)[0, 1]) * 100

    everything = np.arange(len(df))
    value = fit(everything)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(bootstrap):
        rows = rng.choice(everything, size=len(everything), replace=True)
        try:
            refits.append(fit(rows))
        except ValueError:  # a draw with too few distinct rows for the folds
            continue
    stderr = float(np.std(refits, ddof=1)) if len(refits) >= 2 else None
    return value, stderr
