"""What of a run view goes to MLflow, and under which names: metrics, parameters, tags, the files
uploaded as artifacts, and the fingerprint that says whether a model must be logged again.

Nothing here imports MLflow; :mod:`harness.tracking` sends these records, :mod:`harness.registry`
tags model versions with the same keys. Metric names, by model (``base``, ``iter_NN``):

* each evaluation metric by its own name, with ``<name>_stderr``; ``judge/accuracy``,
  ``judge/position_bias``, ``judge/trusted``; ``eval/seconds``;
* ``curation/*`` (score histogram, unscored rate, curator precision and recall, keep rate,
  selected, candidates, k), ``data/*`` (contamination, lengths, distinct-n, near duplicates),
  ``train/*`` (every number the finetune stage reported), ``gate/passed``;
* per gated metric ``gate/<metric>/change`` (``_low``, ``_high``: its interval), ``/mde``,
  ``/blind``, ``/items_needed``, ``/outcome`` (1 pass, 0 inconclusive, -1 regression);
  ``head_to_head/vs_iter_NN/win_rate`` (``_low``, ``_high``, ``mde``);
* ``resources/<stage>_seconds``, ``resources/<stage>_peak_rss_mib`` and, where the stage used a
  GPU, ``resources/<stage>_gpu_peak_mib`` of curate, select, finetune and eval.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from harness.gate import GATE, GateResult
from harness.runview import BASE, CHECKPOINT, EVAL_SUMMARY, JUDGE_NUMBERS, MANIFEST, Curation, EvalSummary, \
    ModelView, RunView, Selection

TAG_RUN_DIR = "humpback.run_dir"
TAG_CONFIG = "humpback.config_digest"
TAG_ITERATION = "humpback.iteration"
TAG_FINGERPRINT = "humpback.fingerprint"
TAG_CHECKPOINT = "humpback.checkpoint"
BASE_STEP = -1
MAX_TAG_CHARS = 5000
RESOURCE_STAGES = ("curate", "select", "finetune", "eval")

LOGGED_METRICS_VERSION = "6"
"""Part of every model's fingerprint: raised when the metrics logged from the same files change
(2: ``resources/*``), so a run logged by an older harness is brought up to date."""


def _value(value: Any) -> float | None:
    """A number (a bool counts, as 0 or 1) as a float; anything else None."""
    return float(value) if isinstance(value, (int, float)) else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"select": {"k": 4}}`` -> ``{"select.k": "4"}``; lists and None as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def step_of(model: ModelView) -> int:
    """The metric step of a model: -1 for ``base`` (left of M0 on the parent's charts), t for ``iter_t``."""
    return BASE_STEP if model.iteration is None else model.iteration


def metric_name(name: str) -> str:
    """MLflow accepts alphanumerics, ``_ - . / space`` in names; anything else becomes ``_``."""
    return re.sub(r"[^\w./\- ]", "_", name)


# --------------------------------------------------------------------------- metrics


def eval_metrics(summary: EvalSummary | None) -> dict[str, float]:
    """Metrics of an evaluation summary: each value, its stderr, and the judge check."""
    if summary is None:
        return {}
    out: dict[str, float] = {}
    for name, m in summary.metrics.items():
        if _value(m.value) is not None:
            out[name] = float(m.value)
        if _value(m.stderr) is not None:
            out[f"{name}_stderr"] = float(m.stderr)
    for key in (*JUDGE_NUMBERS, "trusted"):
        value = _value(getattr(summary.judge_check, key))
        if value is not None:
            out[f"judge/{key}"] = value
    if _value(summary.seconds) is not None:
        out["eval/seconds"] = float(summary.seconds)
    return out


def curation_metrics(curation: Curation, selection: Selection) -> dict[str, float]:
    """``curation/*`` and ``data/*`` metrics from the curate and select stage stats."""
    out: dict[str, Any] = {f"curation/score_hist_{key}": value for key, value in curation.histogram.items()}
    out["curation/unscored_rate"] = curation.unscored_rate
    for key, value in (selection.curator or curation.curator).items():
        out[f"curation/curator_{key}"] = value
    for key, value in curation.calibration.items():
        out[f"curation/calibration_{key}"] = value
    for key in ("keep_rate", "selected", "candidates", "k"):
        out[f"curation/{key}"] = getattr(selection, key)
    out["curation/unscored"] = curation.unscored if selection.unscored is None else selection.unscored
    out["data/contaminated"] = selection.contaminated
    out["curation/planted_flagged"] = curation.planted
    out["data/left_out_planted"] = selection.flagged
    for field in ("instruction_chars", "response_chars"):
        for stat in ("mean", "std"):
            out[f"data/{field}_{stat}"] = getattr(getattr(selection, field), stat)
    for key in ("instruction_distinct_1", "instruction_distinct_2"):
        out[f"data/{key}"] = getattr(selection, key)
    out["data/near_duplicate_rate"] = selection.near_duplicate_rate
    return {k: float(v) for k, v in out.items() if _value(v) is not None}


def resource_metrics(model: ModelView) -> dict[str, float]:
    """Seconds, resident peak and GPU peak of one model's stages, from their manifests: where time
    and memory went, by iteration, in MLflow's charts and compare view."""
    out: dict[str, float] = {}
    for name in RESOURCE_STAGES:
        stage = model.stages.get(name)
        for key in ("seconds", "peak_rss_mib", "gpu_peak_mib"):
            value = _value(getattr(stage, key, None))
            if value is not None:
                out[f"resources/{name}_{key}"] = value
    return out


def iteration_metrics(model: ModelView) -> dict[str, float]:
    """Every metric of one model, named as in the module docstring."""
    out = eval_metrics(model.eval)
    out.update(curation_metrics(model.curation, model.selection))
    out.update({f"train/{k}": float(v) for k, v in model.training.items() if _value(v) is not None})
    out.update(resource_metrics(model))
    if model.gate is not None:
        out["gate/passed"] = float(model.gate.passed)
        out.update(gate_metrics(model.gate))
    for against, r in ((model.head_to_head or {}).get("against") or {}).items():
        interval = r.get("interval_95") or [None, None]
        out.update({f"head_to_head/vs_{against}/win_rate": r.get("win_rate"),
                    f"head_to_head/vs_{against}/win_rate_low": interval[0],
                    f"head_to_head/vs_{against}/win_rate_high": interval[1],
                    f"head_to_head/vs_{against}/mde": r.get("mde_95")})
    return {metric_name(k): float(v) for k, v in out.items() if _value(v) is not None}


OUTCOME_CODES = {"pass": 1.0, "inconclusive": 0.0, "regression": -1.0}
"""``gate/<metric>/outcome`` as a number MLflow can chart (refused and missing are left out)."""


def gate_metrics(gate: GateResult) -> dict[str, float | None]:
    """Per gated metric: the paired change and its interval, the MDE, blindness and the outcome."""
    out: dict[str, float | None] = {}
    for d in gate.decisions:
        if d.outcome is None:
            continue
        prefix = f"gate/{d.check}"
        out.update({f"{prefix}/change": d.estimate, f"{prefix}/change_low": d.low, f"{prefix}/change_high": d.high,
                    f"{prefix}/mde": d.mde, f"{prefix}/blind": None if d.blind is None else float(d.blind),
                    f"{prefix}/items_needed": d.items_needed, f"{prefix}/outcome": OUTCOME_CODES.get(d.outcome)})
    return out


# --------------------------------------------------------------------------- tags


def gate_reason(gate: GateResult) -> str:
    """One line for the ``gate.reason`` tag: the failed checks and why, or that all passed."""
    failed = gate.failures()
    if not failed:
        return "all checks passed"
    return "; ".join(f"{d.check}: {d.reason}" for d in failed)[:MAX_TAG_CHARS]


def default_experiment_name(view: RunView) -> str:
    """``humpback/<run.name>`` (the run directory's name when the config has none)."""
    return f"humpback/{view.run_name or view.root.resolve().name}"


def parent_tags(view: RunView, digest: str) -> dict[str, str]:
    """The parent run's tags: run directory, config digest, git commit, backward checkpoint."""
    root = view.root.resolve()
    tags = {TAG_RUN_DIR: str(root), TAG_CONFIG: digest}
    if view.git_commit:
        tags["mlflow.source.git.commit"] = tags["humpback.git_commit"] = str(view.git_commit)
    if (root / "backward" / "model").exists():
        tags["humpback.backward_checkpoint"] = str(root / "backward" / "model")
    return tags


def iteration_tags(view: RunView, model: ModelView) -> dict[str, str]:
    """A child run's tags: which model, its checkpoint path, untrusted metrics, and its gate."""
    root = view.root.resolve()
    tags = {TAG_ITERATION: model.name, TAG_RUN_DIR: str(root)}
    if model.checkpoint:
        tags[TAG_CHECKPOINT] = str(root / model.name / CHECKPOINT)  # checkpoints stay on disk
    if model.name == BASE:
        base = (view.config.get("model") or {}).get("base")
        if base:
            tags["humpback.base_model"] = str(base)
    if model.eval is not None:
        untrusted = [k for k, m in model.eval.metrics.items() if m.trusted is False]
        tags["eval.untrusted"] = ",".join(untrusted)[:MAX_TAG_CHARS]
    if model.gate is not None:
        tags["gate.passed"] = str(model.gate.passed).lower()
        tags["gate.reason"] = gate_reason(model.gate)
        tags["gate.baseline"] = str(model.gate.baseline)
        fixed = model.gate.fixed_point()
        if fixed is not None:  # this iteration repeated the previous one's data (see gate.stop_at_fixed_point)
            tags["gate.fixed_point"] = fixed.reason[:MAX_TAG_CHARS]
        unfiltered = model.gate.unfiltered()
        if unfiltered is not None:  # the threshold left out no scored candidate (see gate.on_unfiltered)
            tags["gate.unfiltered"] = unfiltered.reason[:MAX_TAG_CHARS]
    return tags


# --------------------------------------------------------------------------- files


def model_files(root: Path, name: str) -> list[tuple[Path, str]]:
    """(file, artifact folder) pairs worth uploading for one model; only those that exist."""
    it = root / name
    wanted = [(it / s / MANIFEST, s) for s in ("curate", "select", "finetune")]
    wanted += [(it / EVAL_SUMMARY, "eval"), (it / GATE, ""), (it / "summary.json", "")]
    return [(path, folder) for path, folder in wanted if path.is_file()]


def run_files(root: Path) -> list[tuple[Path, str]]:
    """The parent's artifacts: config, environment, stage manifests, report and plots."""
    wanted = [(root / f, "") for f in ("config.yaml", "env.json", "summary.json", "report.md", "report.html")]
    wanted += [(root / s / MANIFEST, s) for s in ("seed", "corpus", "backward", "augment")]
    if (root / "plots").is_dir():
        wanted += [(p, "plots") for p in sorted((root / "plots").glob("*.png"))]
    return [(path, folder) for path, folder in wanted if path.is_file()]


def fingerprint(root: Path, name: str) -> str:
    """Digest of the files a model is logged from (and of what is logged from them): unchanged
    means nothing to do."""
    h = hashlib.sha256(LOGGED_METRICS_VERSION.encode() + b"\0")
    for path, _ in model_files(root, name):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
