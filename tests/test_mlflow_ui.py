"""MLflow's compare view of two iterations, rendered for real in headless Chromium.

Skipped where Chromium is absent; ``.ci/run`` installs it. The server and the browser only ever
talk to 127.0.0.1, and both are stopped by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from test_tracking import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture
def mlflow_server(tmp_path):
    from harness import tracking

    run = make_run(tmp_path / "runs")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no background job workers: only the UI is needed
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", 90)
        yield f"http://127.0.0.1:{port}", logged
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def _render(url: str, tmp_path: Path) -> str:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000",
            "--window-size=1600,1200", "--dump-dom", url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    subprocess.run(args[:-2] + [f"--screenshot={tmp_path / 'compare.png'}", url], capture_output=True, timeout=120)
    return out.stdout


def test_compare_view_shows_two_iterations_side_by_side(mlflow_server, tmp_path):
    base_url, logged = mlflow_server
    children = logged["child_run_ids"]
    runs = [children["iter_01"], children["iter_02"]]
    url = (f"{base_url}/#/compare-runs?runs={quote(json.dumps(runs))}"
           f"&experiments={quote(json.dumps([logged['experiment_id']]))}")
    dom = _render(url, tmp_path)
    assert "iter_01" in dom and "iter_02" in dom, dom[-2000:]
    assert "alpaca_eval/win_rate" in dom
    assert "curation/keep_rate" in dom
    assert (tmp_path / "compare.png").stat().st_size > 10_000  # a real page, not a blank frame
