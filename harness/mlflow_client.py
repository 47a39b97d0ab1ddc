"""MLflow, offline and quiet: the import with telemetry off, a client of one store, and the default
store (a sqlite database beside the run directories, artifacts in ``mlartifacts/`` next to it).

MLflow is imported lazily (only when tracking is used), after telemetry is switched off. Used by
:mod:`harness.tracking` (runs) and :mod:`harness.registry` (registered models).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 sends usage telemetry unless told not to
    "DO_NOT_TRACK": "true",  # the cross-tool convention MLflow also honours
    "GIT_PYTHON_REFRESH": "quiet",  # run-context tags probe git; no warning when it is absent
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # else every finished run prints 2 lines
}
"""Set with ``setdefault`` before MLflow is imported, so a user's own choice still wins."""


def import_mlflow() -> Any:
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
def quiet() -> Iterator[None]:
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


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlartifacts/`` beside a local database.

    MLflow would otherwise use ``./mlruns`` relative to the current directory. A server
    (``http://...``) decides for itself, so None.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` of that store, for runs and for the model registry alike."""
    import_mlflow()
    from mlflow import MlflowClient

    # The registry lives in the same store; MLflow 3 may otherwise pick another default.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
