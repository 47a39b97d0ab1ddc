"""Mirror a run directory into MLflow: the run directory is the truth, MLflow is the index.

Run as: ``log_run(Path("runs/demo"), tracking_uri=None, experiment=None, register_model_name=None)``
(the caller decides whether tracking is on at all; ``"off"`` is accepted and does nothing).

What lands where:

* one experiment per config (``humpback/<run.name>`` unless named), one **parent run** per run
  directory. The parent is found again by two tags, the run directory's absolute path and the
  config digest, so logging is idempotent: a later call updates the same parent.
* one **child run** per evaluated model: ``base`` (the untuned model), ``iter_00`` (M0),
  ``iter_01``, ... Base is a child of its own so that MLflow's compare view has one row per model;
  its metrics use ``step=-1`` so that, on the parent's charts, it sits left of M0 (step 0).
* metrics with ``step=iteration`` on the child and on the parent (evaluation, curation, data
  quality, training, the gate, and each stage's seconds and peak memory as ``resources/*``);
  the whole resolved config,
  flattened to ``section.key``, as parameters of the parent.
* datasets (seed, candidates, each iteration's selected pairs) as run inputs, with the stage's
  ``output_digest`` as digest; manifests, eval summaries, ``gate.json``, a 20-pair sample of the
  selected data and the report files as artifacts. Checkpoints stay on disk: their path is a tag.
* :func:`register_champion` registers the checkpoint of the last iteration whose gate passed as a
  model version whose source is the checkpoint path, and points the ``champion`` alias at it.

MLflow is imported lazily (only when tracking is used), after telemetry is switched off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.digests import file_digest, settings_digest

log = logging.getLogger(__name__)

MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 sends usage telemetry unless told not to
    "DO_NOT_TRACK": "true",  # the cross-tool convention MLflow also honours
    "GIT_PYTHON_REFRESH": "quiet",  # run-context tags probe git; no warning when it is absent
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # else every finished run prints 2 lines
}
"""Set with ``setdefault`` before MLflow is imported, so a user's own choice still wins."""
TAG_RUN_DIR = "humpback.run_dir"
TAG_CONFIG = "humpback.config_digest"
TAG_ITERATION = "humpback.iteration"
TAG_FINGERPRINT = "humpback.fingerprint"
TAG_CHECKPOINT = "humpback.checkpoint"
PARENT_TAG = "mlflow.parentRunId"
CONTEXT_TAG = "mlflow.data.context"
BASE = "base"
BASE_STEP = -1
CHAMPION = "champion"
SAMPLE_PAIRS = 20
DATASET_TEXT_CHARS = 64  # only the schema and row count reach MLflow, so long texts are cut
MAX_TAG_CHARS = 5000
_ITER = re.compile(r"^iter_(\d+)$")


# --------------------------------------------------------------------------- MLflow, offline


def _mlflow() -> Any:
    """Import MLflow with telemetry off (it is decided at import time, so env vars come first)."""
    for key, value in MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow
    import mlflow.data  # noqa: F401 - registers the dataset sources

    _stop_telemetry()
    return mlflow


def _stop_telemetry() -> None:
    """MLflow imported before the env vars were set already started its telemetry client: stop it."""
    try:
        from mlflow.telemetry import get_telemetry_client, set_telemetry_client
        from mlflow.telemetry.utils import is_telemetry_disabled
    except ImportError:  # a future MLflow without these hooks
        return
    client = get_telemetry_client()
    if client is not None and is_telemetry_disabled():
        client.flush(terminate=True)
        set_telemetry_client()  # re-evaluates the env vars: no client


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MLflow's INFO chatter (database migrations) and its warnings, for this call only."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<run root>/mlflow.db``: a local database beside the run directories."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db').as_posix()}"


def _artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlartifacts/`` beside a local database.

    MLflow would otherwise use ``./mlruns`` relative to the current directory. A server
    (``http://...``) decides for itself, so None.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _client(tracking_uri: str) -> Any:
    _mlflow()
    from mlflow import MlflowClient

    # The registry lives in the same store; MLflow 3 may otherwise pick another default.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --------------------------------------------------------------------------- reading the run dir


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:  # written by hand or half-written: skip, do not fail
        log.warning("mlflow: %s is not valid JSON (%s); left out", path, exc)
        return None


def _metrics_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An eval summary's metrics, each as a dict (a bare number is taken as the value)."""
    return {k: (m if isinstance(m, dict) else {"value": m}) for k, m in (summary.get("metrics") or {}).items()}


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a mapping ({} when absent)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


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


def iterations(run_dir: Path) -> list[str]:
    """The models this run directory has something for: ``base`` (if evaluated), ``iter_NN``."""
    root = Path(run_dir)
    names = [BASE] if (root / BASE / "eval" / "summary.json").exists() else []
    found = [p.name for p in root.iterdir() if p.is_dir() and _ITER.match(p.name)]
    return names + sorted(found, key=lambda n: int(_ITER.match(n).group(1)))


def step_of(name: str) -> int:
    """The metric step of a model: -1 for ``base``, t for ``iter_t``."""
    return BASE_STEP if name == BASE else int(_ITER.match(name).group(1))


def metric_name(name: str) -> str:
    """MLflow accepts alphanumerics, ``_ - . / space`` in names; anything else becomes ``_``."""
    return re.sub(r"[^\w./\- ]", "_", name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def eval_metrics(summary: dict[str, Any] | None) -> dict[str, float]:
    """Metrics of an eval ``summary.json``: each value, its stderr, and the judge check."""
    if not summary:
        return {}
    out: dict[str, float] = {}
    for name, m in _metrics_of(summary).items():
        if _number(m.get("value")) is not None:
            out[name] = float(m["value"])
        if _number(m.get("stderr")) is not None:
            out[f"{name}_stderr"] = float(m["stderr"])
    for key in ("accuracy", "position_bias", "trusted"):
        value = _number((summary.get("judge_check") or {}).get(key))
        if value is not None:
            out[f"judge/{key}"] = value
    if _number(summary.get("seconds")) is not None:
        out["eval/seconds"] = float(summary["seconds"])
    return out


def curation_metrics(curate: dict[str, Any], select: dict[str, Any]) -> dict[str, float]:
    """``curation/*`` and ``data/*`` metrics from the curate and select stage stats."""
    out: dict[str, float] = {}
    for key, value in (curate.get("histogram") or {}).items():
        out[f"curation/score_hist_{key}"] = value
    out["curation/unscored_rate"] = curate.get("unscored_rate")
    for key, value in (select.get("curator") or curate.get("curator") or {}).items():
        out[f"curation/curator_{key}"] = value
    for key in ("keep_rate", "selected", "candidates", "k"):
        out[f"curation/{key}"] = select.get(key)
    out["curation/unscored"] = select.get("unscored", curate.get("unscored"))
    out["data/contaminated"] = select.get("contaminated")
    quality = select.get("quality") or {}
    for field in ("instruction_chars", "response_chars"):
        for stat in ("mean", "std"):
            out[f"data/{field}_{stat}"] = (quality.get(field) or {}).get(stat)
    for key in ("instruction_distinct_1", "instruction_distinct_2"):
        out[f"data/{key}"] = quality.get(key)
    out["data/near_duplicate_rate"] = quality.get("instruction_near_duplicate_rate")
    return {k: float(v) for k, v in out.items() if _number(v) is not None}


def iteration_metrics(run_dir: Path, name: str) -> dict[str, float]:
    """Every metric of one model (``base`` or ``iter_NN``), named as in the module docstring."""
    it = Path(run_dir) / name
    out = eval_metrics(_json(it / "eval" / "summary.json"))
    curate = (_json(it / "curate" / "manifest.json") or {}).get("stats") or {}
    select = (_json(it / "select" / "manifest.json") or {}).get("stats") or {}
    out.update(curation_metrics(curate, select))
    train = (_json(it / "finetune" / "manifest.json") or {}).get("stats") or {}
    out.update({f"train/{k}": float(v) for k, v in train.items() if _number(v) is not None})
    out.update(resource_metrics(it))
    gate = _json(it / "gate.json")
    if gate is not None:
        out["gate/passed"] = float(bool(gate.get("passed")))
    return {metric_name(k): v for k, v in out.items()}


def resource_metrics(model_dir: Path) -> dict[str, float]:
    """``resources/<stage>_seconds``, ``resources/<stage>_peak_rss_mib`` and, where the stage used a
    GPU, ``resources/<stage>_gpu_peak_mib`` of one model's stages (curate, select, finetune, eval),
    from their manifests: where time and memory went, by iteration, in MLflow's charts and
    compare view."""
    out: dict[str, float] = {}
    for stage in ("curate", "select", "finetune", "eval"):
        manifest = _json(model_dir / stage / "manifest.json") or {}
        for key in ("seconds", "peak_rss_mib", "gpu_peak_mib"):
            if _number(manifest.get(key)) is not None:
                out[f"resources/{stage}_{key}"] = float(manifest[key])
    return out


def gate_reason(gate: dict[str, Any]) -> str:
    """One line for the ``gate.reason`` tag: the failed checks and why, or that all passed."""
    failed = [d for d in gate.get("decisions", []) if not d.get("passed")]
    if not failed:
        return "all checks passed"
    return "; ".join(f"{d.get('check')}: {d.get('reason')}" for d in failed)[:MAX_TAG_CHARS]


def _small_files(run_dir: Path, name: str) -> list[tuple[Path, str]]:
    """(file, artifact folder) pairs worth uploading for one model; only those that exist."""
    it = Path(run_dir) / name
    wanted = [(it / s / "manifest.json", s) for s in ("curate", "select", "finetune")]
    wanted += [(it / "eval" / "summary.json", "eval"), (it / "gate.json", ""), (it / "summary.json", "")]
    return [(path, folder) for path, folder in wanted if path.is_file()]


LOGGED_METRICS_VERSION = "2"
"""Part of every iteration's fingerprint: raised when the metrics logged from the same files
change (2: ``resources/*``), so a run logged by an older harness is brought up to date."""


def fingerprint(run_dir: Path, name: str) -> str:
    """Digest of the small files an iteration is logged from (and of what is logged from them):
    unchanged means nothing to do."""
    h = hashlib.sha256(LOGGED_METRICS_VERSION.encode() + b"\0")
    for path, _ in _small_files(run_dir, name):
        h.update(path.relative_to(run_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- datasets


def _light_frame(path: Path) -> Any:
    """The JSONL file as a DataFrame of its scalar fields, long strings cut short.

    MLflow stores only a dataset's schema, row count and digest, so the texts themselves are not
    needed; cutting them keeps a 500k-segment candidate file cheap to describe.
    """
    import pandas as pd

    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            rows.append({k: (v[:DATASET_TEXT_CHARS] if isinstance(v, str) else v)
                         for k, v in record.items() if v is None or isinstance(v, (str, int, float, bool))})
    return pd.DataFrame(rows)


def _dataset_digest(path: Path, manifest: Path) -> str:
    digest = (_json(manifest) or {}).get("output_digest")
    # A file without a manifest (a hand-made run dir): hash the file itself.
    return str(digest) if digest else file_digest(path)[:16]


def _dataset_input(path: Path, digest: str, name: str, context: str) -> Any:
    """A ``DatasetInput`` for one stage output, described by a light DataFrame."""
    mlflow = _mlflow()
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_pandas(_light_frame(path), source=str(path.resolve()), name=name, digest=digest)
    # _to_mlflow_entity is what mlflow.log_input itself calls; the client API has no public twin.
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, context)])


def _log_datasets(client: Any, run_id: str, specs: list[tuple[Path, Path, str, str]]) -> None:
    """Log (file, manifest, name, context) datasets the run does not have yet.

    The client API rather than ``mlflow.log_input``: the same call without a global active run.
    Datasets already on the run (same name and digest) are skipped before the file is read, so a
    500k-line candidate file is described once, not at every call.
    """
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    inputs = []
    for path, manifest, name, context in specs:
        if not path.is_file():
            continue
        digest = _dataset_digest(path, manifest)
        if (name, digest) not in have:
            inputs.append(_dataset_input(path, digest, name, context))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _run_datasets(run_dir: Path) -> list[tuple[Path, Path, str, str]]:
    root = Path(run_dir)
    return [
        (root / "seed" / "data.jsonl", root / "seed" / "manifest.json", "seed", "training"),
        (root / "augment" / "candidates.jsonl", root / "augment" / "manifest.json", "candidates", "candidates"),
    ]


def _iteration_datasets(run_dir: Path, name: str) -> list[tuple[Path, Path, str, str]]:
    """What M_t was trained on: the seed, and from iter_01 on the selected pairs."""
    if name == BASE:
        return []
    root, it = Path(run_dir), Path(run_dir) / name
    specs = [(root / "seed" / "data.jsonl", root / "seed" / "manifest.json", "seed", "training")]
    specs.append((it / "select" / "data.jsonl", it / "select" / "manifest.json", f"selected_{name}", "training"))
    return specs


# --------------------------------------------------------------------------- artifacts


def _log_files(client: Any, run_id: str, files: list[tuple[Path, str]]) -> None:
    for path, folder in files:
        client.log_artifact(run_id, str(path), folder or None)


def _log_sample(client: Any, run_id: str, data: Path, n: int = SAMPLE_PAIRS) -> None:
    """The first ``n`` selected pairs, so the MLflow UI shows what the model was trained on."""
    if not data.is_file():
        return
    with open(data, encoding="utf-8") as fh:
        lines = [line for _, line in zip(range(n), fh)]
    with tempfile.TemporaryDirectory(prefix="humpback-sample-") as tmp:
        sample = Path(tmp) / "sample.jsonl"
        sample.write_text("".join(lines), encoding="utf-8")
        client.log_artifact(run_id, str(sample), "select")


def _run_files(run_dir: Path) -> list[tuple[Path, str]]:
    """The parent's artifacts: config, environment, stage manifests, report and plots."""
    root = Path(run_dir)
    wanted = [(root / f, "") for f in ("config.yaml", "env.json", "summary.json", "report.md", "report.html")]
    wanted += [(root / s / "manifest.json", s) for s in ("seed", "corpus", "backward", "augment")]
    if (root / "plots").is_dir():
        wanted += [(p, "plots") for p in sorted((root / "plots").glob("*.png"))]
    return [(path, folder) for path, folder in wanted if path.is_file()]


# --------------------------------------------------------------------------- runs


def default_experiment_name(run_dir: Path, config: dict[str, Any]) -> str:
    """``humpback/<run.name>`` (the run directory's name when the config has none)."""
    return f"humpback/{(config.get('run') or {}).get('name') or Path(run_dir).name}"


def _experiment(client: Any, name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as exc:  # another process created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":  # a deleted name cannot be reused, only restored
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _parent_tags(run_dir: Path, digest: str) -> dict[str, str]:
    tags = {TAG_RUN_DIR: str(run_dir), TAG_CONFIG: digest}
    commit = (_json(run_dir / "env.json") or {}).get("git_commit")
    if commit:
        tags["mlflow.source.git.commit"] = tags["humpback.git_commit"] = str(commit)
    if (run_dir / "backward" / "model").exists():
        tags["humpback.backward_checkpoint"] = str(run_dir / "backward" / "model")
    return tags


def _parent_run(client: Any, exp_id: str, run_dir: Path, config: dict[str, Any]) -> tuple[str, bool]:
    """The parent run of this run directory and config (found by tags), or a new one."""
    digest = settings_digest(config)
    # Filter on the digest only and compare the path here: a path may hold quotes.
    for run in client.search_runs([exp_id], filter_string=f"tags.`{TAG_CONFIG}` = '{digest}'"):
        tags = run.data.tags
        if tags.get(TAG_RUN_DIR) == str(run_dir) and PARENT_TAG not in tags:
            return run.info.run_id, False
    name = (config.get("run") or {}).get("name") or run_dir.name
    run_id = client.create_run(exp_id, tags=_parent_tags(run_dir, digest), run_name=name).info.run_id
    _log_params(client, run_id, config)
    return run_id, True


def _log_params(client: Any, run_id: str, config: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    for batch in _batches(params, 100):  # MLflow's per-call limit
        client.log_batch(run_id, params=batch)


def _children(client: Any, exp_id: str, parent_id: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags[TAG_ITERATION]: r for r in runs if TAG_ITERATION in r.data.tags}


def _iteration_tags(run_dir: Path, name: str) -> dict[str, str]:
    it = run_dir / name
    tags = {TAG_ITERATION: name, TAG_RUN_DIR: str(run_dir)}
    if (it / "finetune" / "model").exists():
        tags[TAG_CHECKPOINT] = str(it / "finetune" / "model")  # checkpoints stay on disk
    if name == BASE:
        base = (read_config(run_dir).get("model") or {}).get("base")
        if base:
            tags["humpback.base_model"] = str(base)
    summary = _json(it / "eval" / "summary.json") or {}
    untrusted = [k for k, m in _metrics_of(summary).items() if m.get("trusted") is False]
    if summary:
        tags["eval.untrusted"] = ",".join(untrusted)[:MAX_TAG_CHARS]
    gate = _json(it / "gate.json")
    if gate is not None:
        tags["gate.passed"] = str(bool(gate.get("passed"))).lower()
        tags["gate.reason"] = gate_reason(gate)
        tags["gate.baseline"] = str(gate.get("baseline"))
    return tags


def _log_metrics(client: Any, run_ids: list[str], metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, step) for k, v in sorted(metrics.items())]
    for run_id in run_ids:
        for batch in _batches(entries, 1000):
            client.log_batch(run_id, metrics=batch)


def _log_iteration(client: Any, exp_id: str, parent_id: str, run_dir: Path, name: str, child: Any) -> tuple[str, bool]:
    """Create or update one child run; returns (run id, created).

    Unchanged files (same fingerprint) mean nothing to do. Otherwise only metrics that are new or
    changed are logged, on the child and on the parent at ``step=iteration``, so a rerun never
    doubles a metric's history. The fingerprint is written last: a crash means a redo next time.
    """
    from mlflow.entities import RunTag

    fp = fingerprint(run_dir, name)
    if child is not None and child.data.tags.get(TAG_FINGERPRINT) == fp:
        return child.info.run_id, False
    created = child is None
    if created:
        tags = {PARENT_TAG: parent_id, TAG_ITERATION: name, TAG_RUN_DIR: str(run_dir)}
        child = client.create_run(exp_id, tags=tags, run_name=name)
        # The config on every child too: MLflow's compare view shows the selected runs' own params.
        _log_params(client, child.info.run_id, read_config(run_dir))
    run_id, known = child.info.run_id, child.data.metrics
    metrics = {k: v for k, v in iteration_metrics(run_dir, name).items() if known.get(k) != v}
    # Parent first: after a crash in between, the child lacks the metric and both get it again.
    _log_metrics(client, [parent_id, run_id], metrics, step_of(name))
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _iteration_tags(run_dir, name).items()])
    _log_files(client, run_id, _small_files(run_dir, name))
    _log_sample(client, run_id, run_dir / name / "select" / "data.jsonl")
    _log_datasets(client, run_id, _iteration_datasets(run_dir, name))
    client.set_terminated(run_id)
    client.set_tag(run_id, TAG_FINGERPRINT, fp)
    return run_id, created


def log_run(
    run_dir: Path,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    register_model_name: str | None,
) -> dict[str, Any]:
    """Mirror ``run_dir`` into MLflow; safe to call again as the run goes on.

    Args:
        run_dir: The run directory (``runs/<name>``).
        tracking_uri: An MLflow tracking URI; None means ``sqlite:///<run root>/mlflow.db`` with
            artifacts in ``<run root>/mlartifacts``; ``"off"`` logs nothing.
        experiment: Experiment name; None means ``humpback/<run.name>``.
        register_model_name: When set, the champion (see :func:`register_champion`) is registered
            under this name.

    Returns:
        ``tracking_uri``, ``experiment_id``, ``parent_run_id``, ``child_run_ids`` (model name ->
        run id), ``created`` (child runs new in this call) and ``champion`` (or None).
    """
    if tracking_uri is not None and tracking_uri.strip().lower() == "off":
        return {"tracking_uri": None, "experiment_id": None, "parent_run_id": None, "child_run_ids": {},
                "created": [], "champion": None}
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    uri = tracking_uri or default_tracking_uri(run_dir)
    config = read_config(run_dir)
    with _quiet():
        client = _client(uri)
        exp_id = _experiment(client, experiment or default_experiment_name(run_dir, config), _artifact_root(uri))
        parent_id, _ = _parent_run(client, exp_id, run_dir, config)
        children = _children(client, exp_id, parent_id)
        ids: dict[str, str] = {}
        created: list[str] = []
        for name in iterations(run_dir):
            if not _small_files(run_dir, name):  # nothing committed yet (a stage still running)
                continue
            ids[name], new = _log_iteration(client, exp_id, parent_id, run_dir, name, children.get(name))
            created += [name] if new else []
        _log_datasets(client, parent_id, _run_datasets(run_dir))
        _log_files(client, parent_id, _run_files(run_dir))
        client.set_tag(parent_id, "humpback.iterations", ",".join(ids))
        client.set_terminated(parent_id)
    champion = None
    if register_model_name:
        champion = register_champion(run_dir, register_model_name, tracking_uri=uri, child_run_ids=ids)
    log.info("mlflow: run %s in experiment %s (%s); new child runs: %s", parent_id, exp_id, uri, created or "none")
    return {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
            "child_run_ids": ids, "created": created, "champion": champion}


# --------------------------------------------------------------------------- model registry


def champion_iteration(run_dir: Path) -> str | None:
    """The last iteration whose gate passed and whose checkpoint is on disk (M0 has no gate)."""
    best = None
    for name in iterations(run_dir):
        gate = _json(Path(run_dir) / name / "gate.json")
        if gate and gate.get("passed") is True and (Path(run_dir) / name / "finetune" / "model").exists():
            best = name
    return best


def _registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Humpback models whose regression gate passed.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _pointer_source(client: Any, run_id: str, checkpoint: Path) -> str:
    """A run artifact folder holding only the checkpoint's path (for servers; see below)."""
    with tempfile.TemporaryDirectory(prefix="humpback-pointer-") as tmp:
        (Path(tmp) / "checkpoint.json").write_text(json.dumps({"path": str(checkpoint)}) + "\n")
        client.log_artifact(run_id, str(Path(tmp) / "checkpoint.json"), "checkpoint")
    return f"{client.get_run(run_id).info.artifact_uri}/checkpoint"


def _model_version(client: Any, name: str, checkpoint: Path, run_id: str | None, tags: dict[str, str]) -> Any:
    """The version of ``name`` for this checkpoint: reused if registered before, else created.

    The source is the checkpoint directory itself, which a local (sqlite) store accepts. A
    tracking server refuses local paths outside a run's artifacts; then the version points at a
    small pointer artifact of the child run that holds the path.
    """
    from mlflow.exceptions import MlflowException

    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(TAG_CHECKPOINT) == str(checkpoint):
            return version
    description = f"{tags[TAG_ITERATION]} of {tags[TAG_RUN_DIR]}; gate passed"
    try:
        return client.create_model_version(name, str(checkpoint), run_id=run_id, tags=tags, description=description)
    except MlflowException as exc:
        if run_id is None or exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
    source = _pointer_source(client, run_id, checkpoint)
    return client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)


def register_champion(
    run_dir: Path,
    model_name: str,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    child_run_ids: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Register the champion's checkpoint and point the ``champion`` alias at it.

    The champion is the last iteration whose ``gate.json`` says ``passed``; an iteration whose
    gate failed is never registered, so it can never hold the alias. Registering is idempotent
    (one version per checkpoint path).

    Args:
        run_dir: The run directory.
        model_name: Registered model name.
        tracking_uri: As for :func:`log_run` (None: the local default store).
        experiment: Experiment to look the child run up in, when ``child_run_ids`` is not given.
        child_run_ids: Model name -> child run id, as :func:`log_run` returns them; the version is
            linked to the champion's child run.

    Returns:
        ``name``, ``version``, ``iteration``, ``source`` and ``run_id``; None when no iteration
        passed its gate (the alias is then left as it was).
    """
    run_dir = Path(run_dir).resolve()
    pick = champion_iteration(run_dir)
    if pick is None:
        return None
    uri = tracking_uri or default_tracking_uri(run_dir)
    checkpoint = run_dir / pick / "finetune" / "model"
    with _quiet():
        client = _client(uri)
        run_id = (child_run_ids or {}).get(pick)
        if run_id is None:
            run_id = _find_child(client, run_dir, pick, experiment)
        tags = {TAG_RUN_DIR: str(run_dir), TAG_ITERATION: pick, TAG_CHECKPOINT: str(checkpoint), "gate.passed": "true"}
        _registered_model(client, model_name)
        version = _model_version(client, model_name, checkpoint, run_id, tags)
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    log.info("mlflow: %s version %s (%s) is now '%s'", model_name, version.version, pick, CHAMPION)
    return {"name": model_name, "version": str(version.version), "iteration": pick,
            "source": version.source, "run_id": run_id}


def _find_child(client: Any, run_dir: Path, name: str, experiment: str | None) -> str | None:
    exp = client.get_experiment_by_name(experiment or default_experiment_name(run_dir, read_config(run_dir)))
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ITERATION}` = '{name}'")
    for run in runs:
        if run.data.tags.get(TAG_RUN_DIR) == str(run_dir):
            return run.info.run_id
    return None
