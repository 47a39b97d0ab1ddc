"""The MLflow model registry: the run's champion, registered with the ``champion`` alias.

Run as: ``register_champion(Path("runs/demo"), "humpback", tracking_uri=None)``; :func:`harness.
tracking.log_run` calls it when ``tracking.register_model`` is set.

The champion is the last iteration whose ``gate.json`` says ``passed`` and whose checkpoint is on
disk (M0 has no gate). Its checkpoint is registered as a model version whose source is the
checkpoint path, and the ``champion`` alias points at it. An iteration whose gate failed is never
registered, so it can never hold the alias.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from harness.mlflow_client import client as mlflow_client, default_tracking_uri, quiet
from harness.mlflow_records import TAG_CHECKPOINT, TAG_ITERATION, TAG_RUN_DIR, default_experiment_name
from harness.runview import CHECKPOINT, RunView, as_view

log = logging.getLogger(__name__)

CHAMPION = "champion"


def champion_iteration(view: RunView) -> str | None:
    """The last iteration whose gate passed and whose checkpoint is on disk."""
    best = None
    for name, model in view.models.items():
        if model.gate is not None and model.gate.passed and model.checkpoint:
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


def _find_child(client: Any, view: RunView, name: str, experiment: str | None) -> str | None:
    """The child run of model ``name`` of this run directory, looked up by its tags."""
    exp = client.get_experiment_by_name(experiment or default_experiment_name(view))
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ITERATION}` = '{name}'")
    for run in runs:
        if run.data.tags.get(TAG_RUN_DIR) == str(view.root.resolve()):
            return run.info.run_id
    return None


def register_champion(
    run: Path | RunView,
    model_name: str,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    child_run_ids: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Register the champion's checkpoint and point the ``champion`` alias at it.

    Registering is idempotent (one version per checkpoint path).

    Args:
        run: The run directory, or its view.
        model_name: Registered model name.
        tracking_uri: As for :func:`harness.tracking.log_run` (None: the local default store).
        experiment: Experiment to look the child run up in, when ``child_run_ids`` is not given.
        child_run_ids: Model name -> child run id, as :func:`harness.tracking.log_run` returns
            them; the version is linked to the champion's child run.

    Returns:
        ``name``, ``version``, ``iteration``, ``source`` and ``run_id``; None when no iteration
        passed its gate (the alias is then left as it was).
    """
    view = as_view(run)
    pick = champion_iteration(view)
    if pick is None:
        return None
    root = view.root.resolve()
    uri = tracking_uri or default_tracking_uri(root)
    checkpoint = root / pick / CHECKPOINT
    with quiet():
        client = mlflow_client(uri)
        run_id = (child_run_ids or {}).get(pick)
        if run_id is None:
            run_id = _find_child(client, view, pick, experiment)
        tags = {TAG_RUN_DIR: str(root), TAG_ITERATION: pick, TAG_CHECKPOINT: str(checkpoint), "gate.passed": "true"}
        _registered_model(client, model_name)
        version = _model_version(client, model_name, checkpoint, run_id, tags)
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    log.info("mlflow: %s version %s (%s) is now '%s'", model_name, version.version, pick, CHAMPION)
    return {"name": model_name, "version": str(version.version), "iteration": pick,
            "source": version.source, "run_id": run_id}
