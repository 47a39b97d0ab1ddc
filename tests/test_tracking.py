"""harness.tracking against a real (temporary) sqlite MLflow store and hand-made run directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from harness import mlflow_client, mlflow_records, registry, tracking  # noqa: E402 - after the importorskip
from harness.runview import read_run  # noqa: E402

WIN = "alpaca_eval/win_rate"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, str):
        path.write_text(obj, encoding="utf-8")
    elif isinstance(obj, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in obj), encoding="utf-8")
    else:
        path.write_text(json.dumps(obj), encoding="utf-8")


def _manifest(stage: str, digest: str, stats: dict) -> dict:
    return {"stage": stage, "version": "1", "cache_key": "k" + digest, "settings": {}, "settings_digest": "s",
            "inputs": {}, "outputs": {}, "output_digest": digest, "stats": stats, "seconds": 1.0}


def _summary(win: float, stderr: float = 0.05, trusted: bool = True) -> dict:
    prov = {"config_digest": "cfg", "task_version": 1}
    return {"model": "m", "metrics": {
        WIN: {"value": win, "stderr": stderr, "n": 32, "higher_is_better": True, "trusted": trusted,
              "provenance": prov},
        "gsm8k/exact_match_strict": {"value": 0.1, "stderr": 0.02, "n": 32, "higher_is_better": True,
                                     "trusted": True, "provenance": prov},
    }, "judge_check": {"accuracy": 0.7, "position_bias": 0.1, "trusted": trusted, "n": 24}, "seconds": 9.5}


def make_run(root: Path, name: str = "demo", gates: dict[int, bool] | None = None) -> Path:
    """A finished run directory: base, M0 and one iteration per entry of ``gates``."""
    gates = {1: True, 2: False} if gates is None else gates
    run = root / name
    _write(run / "config.yaml", yaml.safe_dump({"run": {"name": name, "seed": 0}, "select": {"k": 4.0},
                                                "finetune": {"method": "lora", "lora_target_modules": ["q", "v"]}}))
    _write(run / "env.json", {"git_commit": "abc123", "packages": {"torch": "2.13.0"}})
    seed = [{"instruction": f"q{i}", "response": "r" * 50, "origin": "seed"} for i in range(6)]
    _write(run / "seed" / "data.jsonl", seed)
    _write(run / "seed" / "manifest.json", _manifest("seed", "seeddigest000001", {"kept": 6}))
    cands = [{"segment_id": f"s{i}", "instruction": f"c{i}", "response": "x" * 300} for i in range(8)]
    _write(run / "augment" / "candidates.jsonl", cands)
    _write(run / "augment" / "manifest.json", _manifest("augment", "augdigest0000001", {"generated": 8}))
    _write(run / "base" / "eval" / "summary.json", _summary(0.30))
    for t in range(0, len(gates) + 1):
        it = run / f"iter_{t:02d}"
        _write(it / "finetune" / "manifest.json", {**_manifest("finetune", f"ft{t}", {"train_pairs": 6 + 2 * t,
                                                                                     "final_loss": 2.0 - 0.25 * t}),
                                                   "peak_rss_mib": 2048.0})
        _write(it / "finetune" / "model" / "adapter_config.json", {"r": 16})
        _write(it / "eval" / "summary.json", _summary(0.40 + 0.1 * t))
        if t == 0:
            continue
        hist = {"1": 1, "2": 1, "3": 2, "4": 2 + t, "5": 1, "unscored": 1 - (t - 1)}
        _write(it / "curate" / "manifest.json", _manifest("curate", f"cur{t}", {
            "pairs": 8, "histogram": hist, "unscored_rate": 0.125, "mode": "logprob"}))
        selected = [dict(c, score=4.0) for c in cands[: 2 + t]]
        _write(it / "select" / "data.jsonl", selected)
        quality = {"instruction_chars": {"mean": 20.0 + t, "std": 2.0}, "response_chars": {"mean": 300.0, "std": 9.0},
                   "instruction_distinct_1": 0.5, "instruction_distinct_2": 0.7,
                   "instruction_near_duplicate_rate": 0.0}
        _write(it / "select" / "manifest.json", _manifest("select", f"seldigest{t:07d}", {
            "candidates": 8, "selected": 2 + t, "keep_rate": (2 + t) / 8, "unscored": 1, "k": 4.0,
            "contaminated": 0, "curator": {"precision": 0.8, "recall": 0.6}, "quality": quality}))
        passed = gates[t]
        decisions = [{"check": WIN, "passed": passed, "reason": "ok" if passed else "dropped from 0.5 to 0.3",
                      "current": 0.4, "baseline": 0.5, "threshold": 0.1}]
        if t == 2:  # a curation whose threshold left out no scored pair (harness.gate.curation_filter_check)
            decisions.append({"check": "curation/filtered", "passed": True, "outcome": "unfiltered",
                              "reason": "unfiltered: k=1.9 is at or below every scored candidate's score"})
        _write(it / "gate.json", {"passed": passed, "baseline": "iter_00", "decisions": decisions})
    return run


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated, empty store: creating one costs seconds, copying it does not."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with mlflow_client.quiet():
        mlflow_client.client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, template_db) -> str:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def _client(uri: str):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_parent_children_params_metrics_and_artifacts(tmp_path, store):
    run = make_run(tmp_path / "runs")
    (run / "report.md").write_text("# report\n")
    (run / "plots").mkdir()
    (run / "plots" / "win_rate.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    client = _client(store)
    assert client.get_experiment(out["experiment_id"]).name == "humpback/demo"
    assert set(out["child_run_ids"]) == {"base", "iter_00", "iter_01", "iter_02"}

    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags[mlflow_records.TAG_RUN_DIR] == str(run.resolve())
    assert parent.data.params["select.k"] == "4.0"
    assert parent.data.params["finetune.lora_target_modules"] == '["q", "v"]'
    assert parent.data.tags["mlflow.source.git.commit"] == "abc123"
    for name, run_id in out["child_run_ids"].items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
        assert child.data.tags["mlflow.runName"] == name

    history = {m.step: m.value for m in client.get_metric_history(out["parent_run_id"], WIN)}
    assert history == pytest.approx({-1: 0.30, 0: 0.40, 1: 0.50, 2: 0.60})
    child1 = client.get_run(out["child_run_ids"]["iter_01"])
    assert [(m.step, m.value) for m in client.get_metric_history(child1.info.run_id, WIN)] == [(1, 0.5)]
    metrics = child1.data.metrics
    assert metrics["curation/keep_rate"] == pytest.approx(3 / 8)
    assert metrics["curation/score_hist_4"] == 3 and metrics["curation/curator_precision"] == 0.8
    assert metrics["data/instruction_chars_mean"] == 21.0 and metrics["data/near_duplicate_rate"] == 0.0
    assert metrics["train/final_loss"] == 1.75 and metrics[f"{WIN}_stderr"] == 0.05
    assert metrics["resources/finetune_seconds"] == 1.0 and metrics["resources/finetune_peak_rss_mib"] == 2048.0
    assert "resources/curate_peak_rss_mib" not in metrics  # that manifest has no such field
    assert child1.data.tags[mlflow_records.TAG_CHECKPOINT] == str(run.resolve() / "iter_01" / "finetune" / "model")
    assert child1.data.tags["gate.passed"] == "true"
    child2 = client.get_run(out["child_run_ids"]["iter_02"])
    assert child2.data.tags["gate.passed"] == "false"
    assert "dropped from 0.5 to 0.3" in child2.data.tags["gate.reason"]
    assert child2.data.tags["gate.unfiltered"].startswith("unfiltered: k=1.9") and "gate.unfiltered" not in child1.data.tags

    arts = {a.path for a in client.list_artifacts(child1.info.run_id, "select")}
    assert arts == {"select/manifest.json", "select/sample.jsonl"}
    top = {a.path for a in client.list_artifacts(child1.info.run_id)}
    assert {"gate.json", "eval", "curate", "finetune"} <= top
    assert "model" not in top  # checkpoints stay on disk
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "env.json", "seed", "report.md"} <= parent_files
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/win_rate.png"]
    # artifacts go beside the database, not to ./mlruns
    assert parent.info.artifact_uri.startswith((Path(store[len("sqlite:///"):]).parent / "mlartifacts").as_uri())


def test_datasets_carry_stage_digests(tmp_path, store):
    run = make_run(tmp_path / "runs")
    out = tracking.log_run(run, tracking_uri=store, experiment="exp", register_model_name=None)
    client = _client(store)

    def inputs(run_id):
        return {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}

    parent = inputs(out["parent_run_id"])
    assert parent["seed"].dataset.digest == "seeddigest000001"
    assert parent["candidates"].dataset.digest == "augdigest0000001"
    assert json.loads(parent["candidates"].dataset.profile)["num_rows"] == 8
    child = inputs(out["child_run_ids"]["iter_02"])
    assert child["selected_iter_02"].dataset.digest == "seldigest0000002"
    assert {t.key: t.value for t in child["selected_iter_02"].tags}["mlflow.data.context"] == "training"
    assert set(inputs(out["child_run_ids"]["iter_00"])) == {"seed"}


def test_rerun_is_idempotent_and_adds_new_iterations(tmp_path, store):
    run = make_run(tmp_path / "runs")
    later = shutil.copytree(run / "iter_02", tmp_path / "iter_02")
    shutil.rmtree(run / "iter_02")  # the run has not reached iteration 2 yet
    first = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    assert first["created"] == ["base", "iter_00", "iter_01"]
    again = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    assert again["parent_run_id"] == first["parent_run_id"] and again["created"] == []
    shutil.copytree(later, run / "iter_02")
    third = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    assert third["parent_run_id"] == first["parent_run_id"] and third["created"] == ["iter_02"]
    assert {k: v for k, v in third["child_run_ids"].items() if k != "iter_02"} == first["child_run_ids"]

    client = _client(store)
    runs = client.search_runs([third["experiment_id"]])
    assert len(runs) == 5  # one parent, four children
    steps = [m.step for m in client.get_metric_history(third["parent_run_id"], WIN)]
    assert sorted(steps) == [-1, 0, 1, 2]  # nothing logged twice
    assert len(client.get_run(third["parent_run_id"]).inputs.dataset_inputs) == 2


def test_a_run_logged_by_an_older_harness_gets_the_new_metrics(tmp_path, store, monkeypatch):
    run = make_run(tmp_path / "runs")
    real = mlflow_records.iteration_metrics
    monkeypatch.setattr(mlflow_records, "iteration_metrics",  # what the previous version logged
                        lambda *a: {k: v for k, v in real(*a).items() if not k.startswith("resources/")})
    monkeypatch.setattr(mlflow_records, "LOGGED_METRICS_VERSION", "1")
    first = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    child = first["child_run_ids"]["iter_01"]
    assert "resources/finetune_seconds" not in _client(store).get_run(child).data.metrics
    monkeypatch.undo()
    again = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name=None)
    assert again["child_run_ids"]["iter_01"] == child and again["created"] == []
    assert _client(store).get_run(child).data.metrics["resources/finetune_seconds"] == 1.0
    steps = [m.step for m in _client(store).get_metric_history(again["parent_run_id"], WIN)]
    assert sorted(steps) == [-1, 0, 1, 2]  # unchanged metrics are not logged twice


def test_champion_alias_goes_to_the_passing_iteration(tmp_path, store):
    run = make_run(tmp_path / "runs", gates={1: True, 2: False})
    out = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name="humpback-demo")
    assert out["champion"]["iteration"] == "iter_01"
    client = _client(store)
    version = client.get_model_version_by_alias("humpback-demo", "champion")
    assert version.source == str(run.resolve() / "iter_01" / "finetune" / "model")
    assert version.run_id == out["child_run_ids"]["iter_01"]
    versions = client.search_model_versions("name = 'humpback-demo'")
    assert [v.tags[mlflow_records.TAG_ITERATION] for v in versions] == ["iter_01"]  # the failing one is never registered
    tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name="humpback-demo")
    assert len(client.search_model_versions("name = 'humpback-demo'")) == 1


def test_no_champion_when_every_gate_fails(tmp_path, store):
    run = make_run(tmp_path / "runs", name="bad", gates={1: False})
    out = tracking.log_run(run, tracking_uri=store, experiment=None, register_model_name="humpback-bad")
    assert out["champion"] is None
    assert registry.register_champion(run, "humpback-bad", tracking_uri=store) is None
    assert _client(store).search_model_versions("name = 'humpback-bad'") == []


def test_default_store_off_and_partial_run(tmp_path, template_db):
    run = make_run(tmp_path / "runs", gates={1: True})
    shutil.rmtree(run / "iter_01" / "eval")
    (run / "iter_01" / "gate.json").unlink()
    off = tracking.log_run(run, tracking_uri="off", experiment=None, register_model_name=None)
    assert off["parent_run_id"] is None
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    shutil.copy(template_db, tmp_path / "runs" / "mlflow.db")  # the default location, pre-migrated
    out = tracking.log_run(run, tracking_uri=None, experiment=None, register_model_name="m")
    assert out["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert out["champion"] is None  # iteration 1 has no gate yet
    metrics = _client(out["tracking_uri"]).get_run(out["child_run_ids"]["iter_01"]).data.metrics
    assert WIN not in metrics and "curation/keep_rate" in metrics


def test_flatten_and_metric_names():
    assert mlflow_records.flatten({"a": {"b": 1, "c": {"d": None}}, "e": "x"}) == {"a.b": "1", "a.c.d": "null", "e": "x"}
    assert mlflow_records.metric_name("ifeval/prompt_level_strict_acc,none") == "ifeval/prompt_level_strict_acc_none"


def test_a_half_written_summary_is_left_out_with_a_warning(tmp_path, store, caplog):
    run = make_run(tmp_path / "runs", gates={1: True})
    bad = run / "iter_01" / "eval" / "summary.json"
    bad.write_text('{"metrics": {', encoding="utf-8")
    out = tracking.log_run(read_run(run), tracking_uri=store, experiment=None, register_model_name=None)
    assert str(bad) in caplog.text
    child = _client(store).get_run(out["child_run_ids"]["iter_01"])
    assert WIN not in child.data.metrics and "curation/keep_rate" in child.data.metrics
    assert "eval.untrusted" not in child.data.tags and child.data.tags["gate.passed"] == "true"
