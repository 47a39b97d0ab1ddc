"""Calibration of the instruments against outside labels, as the loop and the command line use it.

``humpback judge-eval`` and the ``judge_check`` stage run :func:`calibrate_judge`; ``humpback
curator-eval`` and every curation stage run :func:`calibrate_curator`. The measurements
themselves are in :mod:`evals.calibration`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evals.calibration.curator_eval import evaluate_curator, item_rows
from evals.calibration.judge_eval import evaluate_judge
from evals.calibration.pairs import HUMAN_SOURCES, LabelledPair, load_pairs
from harness.config import RunConfig
from pipeline import curate
from pipeline.engine import Engine
from pipeline.models import cache_root

log = logging.getLogger(__name__)


def judge_cache_dir() -> Path:
    """Calibration judgments, one alpaca_eval cache file per judge identity, shared by all runs."""
    return cache_root() / "judge_eval"


def calibration_pairs(cfg: RunConfig, n: int | None, sources: list[str] | None = None) -> list[LabelledPair]:
    return load_pairs(cfg.eval.data_dir, sources or list(cfg.eval.calibration_sources), n, cfg.eval.seed)


CONFIGURED = -1
"""``n`` for :func:`calibrate_judge`: as many pairs as the config says (None means all)."""


def calibrate_judge(judge, cfg: RunConfig, n: int | None = CONFIGURED, sources: list[str] | None = None
                    ) -> dict[str, Any]:
    """The judge against ``n`` labelled pairs per source (None: all; by default
    ``eval.judge_calibration_pairs``), with the trivial judges and the trust verdict."""
    pairs = calibration_pairs(cfg, cfg.eval.judge_calibration_pairs if n == CONFIGURED else n, sources)
    result = evaluate_judge(judge, pairs, cache_dir=judge_cache_dir(), margin=cfg.eval.judge_trust_margin,
                            seed=cfg.eval.seed)
    log.info("judge calibration: %s", result["verdict"])
    return result


def _human_group(groups: dict[str, Any]) -> dict[str, Any] | None:
    """The pooled human-labelled group, or the one human source present."""
    return groups.get("human") or next((groups[g] for g in HUMAN_SOURCES if g in groups), None)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a judge calibration that travel with every evaluation: accuracy on the
    human labels, its difference from always-longer, agreement with GPT-4 (each with its interval)."""
    groups = result["groups"]
    human = _human_group(groups)
    out: dict[str, Any] = {"trusted": result["trusted"], "verdict": result["verdict"]}
    if human is not None:
        acc = human["judges"][result["subject"]]["accuracy"]
        diff = human["vs"].get("longer", {})
        out.update(human_accuracy=acc["value"], human_accuracy_low=acc["low"], human_accuracy_high=acc["high"],
                   human_pairs=acc["n"], minus_longer=diff.get("mean"), minus_longer_low=diff.get("low"),
                   minus_longer_high=diff.get("high"))
    gpt4 = groups.get("alpaca_eval_gpt4")
    if gpt4 is not None:
        agree = gpt4["judges"][result["subject"]]["accuracy"]
        out.update(gpt4_agreement=agree["value"], gpt4_agreement_low=agree["low"], gpt4_agreement_high=agree["high"],
                   gpt4_pairs=agree["n"])
    return out


def curator_rater(engine: Engine, cfg: RunConfig, system: str | None, seed: int):
    """The curator as a rater of single answers: the same prompt, mode and engine as curation."""

    def rate(items: list[dict[str, str]]) -> list[float | None]:
        rows = [{"segment_id": f"calibration-{i}", **item} for i, item in enumerate(items)]
        return [r["score"] for r in curate.score_pairs(engine, rows, cfg.curate, system, seed=seed)]

    return rate


def calibrate_curator(engine: Engine, cfg: RunConfig, system: str | None, n: int, seed: int,
                      subject: str = "curator") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The curator on ``n`` labelled pairs per source, and its per-pair ratings."""
    pairs = calibration_pairs(cfg, n)
    ratings: dict[tuple[str, str], float | None] = {}
    rate = curator_rater(engine, cfg, system, seed)

    def remember(items: list[dict[str, str]]) -> list[float | None]:
        scores = rate(items)
        ratings.update({(i["instruction"], i["response"]): s for i, s in zip(items, scores)})
        return scores

    result = evaluate_curator(remember, pairs, subject=subject, seed=cfg.eval.seed, data_dir=cfg.eval.data_dir)
    result["mode"] = cfg.curate.mode
    return result, item_rows(pairs, ratings)


def curator_headline(result: dict[str, Any]) -> dict[str, Any]:
    """Pairwise accuracy on human labels and with GPT-4, the rank correlation and the suggested k."""
    out: dict[str, Any] = {}
    groups = result["groups"]
    human = _human_group(groups)
    for key, row in (("human", human), ("gpt4", groups.get("alpaca_eval_gpt4"))):
        if row is None:
            continue
        acc = row["raters"][result["subject"]]["accuracy"]
        diff = row["vs"].get("longer", {})
        out.update({f"{key}_accuracy": acc["value"], f"{key}_accuracy_low": acc["low"],
                    f"{key}_accuracy_high": acc["high"], f"{key}_pairs": acc["n"],
                    f"{key}_minus_longer": diff.get("mean"), f"{key}_minus_longer_low": diff.get("low"),
                    f"{key}_minus_longer_high": diff.get("high")})
    rank = result.get("rank_correlation")
    if rank:
        out.update(spearman_gpt4=rank["spearman"]["value"], spearman_gpt4_low=rank["spearman"]["low"],
                   spearman_gpt4_high=rank["spearman"]["high"])
    out["suggested_k"] = result["suggested_k"]["k"]
    out["unscored"] = result["unscored"]
    return out
