"""Mirror a run directory into MLflow: the run directory is the truth, MLflow is the index.

Run as: ``log_run(Path("runs/demo"), tracking_uri=None, experiment=None, register_model_name=None)``
(the caller decides whether tracking is on at all; ``"off"`` is accepted and does nothing).

What lands where (the names are :mod:`harness.mlflow_records`'):

* one experiment per config (``humpback/<run.name>`` unless named), one **parent run** per run
  directory, tagged with the config's ``run.tags``. The parent is found again by two tags, the run directory's absolute path and the
  config digest, so logging is idempotent: a later call updates the same parent.
* one **child run** per evaluated model: ``base`` (the untuned model), ``iter_00`` (M0),
  ``iter_01``, ... Base is a child of its own so that MLflow's compare view has one row per model;
  its metrics use ``step=-1`` so that, on the parent's charts, it sits left of M0 (step 0).
* metrics with ``step=iteration`` on the child and on the parent (evaluation, curation, data
  quality, training, the gate, and each stage's seconds and peak memory as ``resources/*``);
  the whole resolved config, flattened to ``section.key``, as parameters of the parent.
* datasets (seed, candidates, each iteration's selected pairs) as run inputs, with the stage's
  ``output_digest`` as digest; manifests, eval summaries, ``gate.json``, a 20-pair sample of the
  selected data and the report files as artifacts. Checkpoints stay on disk: their path is a tag.
* the champion (:mod:`harness.registry`) is registered when a model name is given.

Everything is read through one :class:`harness.runview.RunView`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from harness import mlflow_records as records
from harness.mlflow_client import artifact_root, client as mlflow_client, default_tracking_uri, import_mlflow, quiet
from harness.mlflow_records import TAG_CONFIG, TAG_FINGERPRINT, TAG_ITERATION, TAG_RUN_DIR
from harness.registry import register_champion
from harness.runview import ModelView, RunView, as_view
from pipeline import faults
from pipeline.digests import file_digest, settings_digest

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
CONTEXT_TAG = "mlflow.data.context"
SAMPLE_PAIRS = 20
DATASET_TEXT_CHARS = 64  # only the schema and row count reach MLflow, so long texts are cut

DatasetSpec = tuple[Path, str | None, str, str]
"""(file, digest from its stage's manifest or None, dataset name, context)."""


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


def _dataset_input(path: Path, digest: str, name: str, context: str) -> Any:
    """A ``DatasetInput`` for one stage output, described by a light DataFrame."""
    mlflow = import_mlflow()
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_pandas(_light_frame(path), source=str(path.resolve()), name=name, digest=digest)
    # _to_mlflow_entity is what mlflow.log_input itself calls; the client API has no public twin.
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, context)])


def _log_datasets(client: Any, run_id: str, specs: list[DatasetSpec]) -> None:
    """Log the datasets the run does not have yet.

    The client API rather than ``mlflow.log_input``: the same call without a global active run.
    Datasets already on the run (same name and digest) are skipped before the file is read, so a
    500k-line candidate file is described once, not at every call. A file without a manifest (a
    hand-made run directory) is digested itself.
    """
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    inputs = []
    for path, digest, name, context in specs:
        if not path.is_file():
            continue
        digest = digest or file_digest(path)[:16]
        if (name, digest) not in have:
            inputs.append(_dataset_input(path, digest, name, context))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _digest(view: RunView, stage: str) -> str | None:
    return view.stages[stage].output_digest if stage in view.stages else None


def _run_datasets(view: RunView, root: Path) -> list[DatasetSpec]:
    return [
        (root / "seed" / "data.jsonl", _digest(view, "seed"), "seed", "training"),
        (root / "augment" / "candidates.jsonl", _digest(view, "augment"), "candidates", "candidates"),
    ]


def _iteration_datasets(view: RunView, root: Path, model: ModelView) -> list[DatasetSpec]:
    """What M_t was trained on: the seed, and from iter_01 on the selected pairs."""
    if model.iteration is None:
        return []
    return [(root / "seed" / "data.jsonl", _digest(view, "seed"), "seed", "training"),
            (root / model.name / "select" / "data.jsonl", _digest(view, f"{model.name}/select"),
             f"selected_{model.name}", "training")]


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


# --------------------------------------------------------------------------- runs


def _experiment(client: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
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


def _parent_run(client: Any, exp_id: str, view: RunView) -> str:
    """The parent run of this run directory and config (found by tags), or a new one."""
    root = view.root.resolve()
    digest = settings_digest(view.config)
    # Filter on the digest only and compare the path here: a path may hold quotes.
    for run in client.search_runs([exp_id], filter_string=f"tags.`{TAG_CONFIG}` = '{digest}'"):
        tags = run.data.tags
        if tags.get(TAG_RUN_DIR) == str(root) and PARENT_TAG not in tags:
            return run.info.run_id
    name = view.run_name or root.name
    run_id = client.create_run(exp_id, tags=records.parent_tags(view, digest), run_name=name).info.run_id
    _log_params(client, run_id, view.config)
    return run_id


def _log_params(client: Any, run_id: str, config: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in records.flatten(config).items()]
    for batch in _batches(params, 100):  # MLflow's per-call limit
        client.log_batch(run_id, params=batch)


def _children(client: Any, exp_id: str, parent_id: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags[TAG_ITERATION]: r for r in runs if TAG_ITERATION in r.data.tags}


def _log_metrics(client: Any, run_ids: list[str], metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, step) for k, v in sorted(metrics.items())]
    for run_id in run_ids:
        for batch in _batches(entries, 1000):
            client.log_batch(run_id, metrics=batch)


def _log_iteration(client: Any, exp_id: str, parent_id: str, view: RunView, model: ModelView,
                   child: Any) -> tuple[str, bool]:
    """Create or update one child run; returns (run id, created).

    Unchanged files (same fingerprint) mean nothing to do. Otherwise only metrics that are new or
    changed are logged, on the child and on the parent at ``step=iteration``, so a rerun never
    doubles a metric's history. The fingerprint is written last: a crash means a redo next time.
    """
    from mlflow.entities import RunTag

    root = view.root.resolve()
    fp = records.fingerprint(root, model.name)
    if child is not None and child.data.tags.get(TAG_FINGERPRINT) == fp:
        return child.info.run_id, False
    created = child is None
    if created:
        tags = {PARENT_TAG: parent_id, TAG_ITERATION: model.name, TAG_RUN_DIR: str(root)}
        child = client.create_run(exp_id, tags=tags, run_name=model.name)
        # The config on every child too: MLflow's compare view shows the selected runs' own params.
        _log_params(client, child.info.run_id, view.config)
    run_id, known = child.info.run_id, child.data.metrics
    metrics = {k: v for k, v in records.iteration_metrics(model).items() if known.get(k) != v}
    # Parent first: after a crash in between, the child lacks the metric and both get it again.
    _log_metrics(client, [parent_id, run_id], metrics, records.step_of(model))
    faults.checkpoint("mlflow.metrics")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in records.iteration_tags(view, model).items()])
    _log_files(client, run_id, records.model_files(root, model.name))
    _log_sample(client, run_id, root / model.name / "select" / "data.jsonl")
    _log_datasets(client, run_id, _iteration_datasets(view, root, model))
    client.set_terminated(run_id)
    client.set_tag(run_id, TAG_FINGERPRINT, fp)
    faults.checkpoint("mlflow.child")
    return run_id, created


def log_run(
    run: Path | RunView,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    register_model_name: str | None,
) -> dict[str, Any]:
    """Mirror a run directory into MLflow; safe to call again as the run goes on.

    Args:
        run: The run directory (``runs/<name>``), or its view.
        tracking_uri: An MLflow tracking URI; None means ``sqlite:///<run root>/mlflow.db`` with
            artifacts in ``<run root>/mlartifacts``; ``"off"`` logs nothing.
        experiment: Experiment name; None means ``humpback/<run.name>``.
        register_model_name: When set, the champion (see :func:`harness.registry.register_champion`)
            is registered under this name.

    Returns:
        ``tracking_uri``, ``experiment_id``, ``parent_run_id``, ``child_run_ids`` (model name ->
        run id), ``created`` (child runs new in this call) and ``champion`` (or None).
    """
    if tracking_uri is not None and tracking_uri.strip().lower() == "off":
        return {"tracking_uri": None, "experiment_id": None, "parent_run_id": None, "child_run_ids": {},
                "created": [], "champion": None}
    view = as_view(run)
    root = view.root.resolve()
    uri = tracking_uri or default_tracking_uri(root)
    with quiet():
        client = mlflow_client(uri)
        exp_id = _experiment(client, experiment or records.default_experiment_name(view), artifact_root(uri))
        parent_id = _parent_run(client, exp_id, view)
        faults.checkpoint("mlflow.parent")
        children = _children(client, exp_id, parent_id)
        ids: dict[str, str] = {}
        created: list[str] = []
        for name, model in view.models.items():
            if not records.model_files(root, name):  # nothing committed yet (a stage still running)
                continue
            ids[name], new = _log_iteration(client, exp_id, parent_id, view, model, children.get(name))
            created += [name] if new else []
        _log_datasets(client, parent_id, _run_datasets(view, root))
        _log_files(client, parent_id, records.run_files(root))
        client.set_tag(parent_id, "humpback.iterations", ",".join(ids))
        for key, value in ((view.config.get("run") or {}).get("tags") or {}).items():
            client.set_tag(parent_id, str(key), str(value))  # run.tags, e.g. ablation=uncurated
        client.set_terminated(parent_id)
    champion = None
    if register_model_name:
        champion = register_champion(view, register_model_name, tracking_uri=uri, child_run_ids=ids)
    log.info("mlflow: run %s in experiment %s (%s); new child runs: %s", parent_id, exp_id, uri, created or "none")
    return {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
            "child_run_ids": ids, "created": created, "champion": champion}
