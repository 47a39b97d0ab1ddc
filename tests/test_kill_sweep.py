"""Kill anywhere: ``humpback iterate`` SIGKILLed at named points of every kind of stage, resumed by
the same command, must end with the outputs of an uninterrupted run and never take an unfinished
stage as finished.

The kill points are the fault sites of :mod:`pipeline.faults` (``HUMPBACK_KILL_AT=<site>@<stage>:<n>``):
the process kills itself there, after writing a marker line that says where, so nothing here
waits on timing. One sequence of processes walks through the loop: killed at the first point,
resumed and killed at the next, ..., then resumed to the end. After every kill, every committed
stage is checked against its manifest (digest of every file); at the end, every stage's
``output_digest`` is compared with an uninterrupted run of the same config (run beside the
sequence, in its own process), and the killed training stages must have resumed from their
trainer checkpoint.

The short sweep (``make test``) kills at :data:`SHORT` points, at least one in every kind of
stage, the report and MLflow; ``HUMPBACK_KILL_SWEEP=full`` (``make test-kill``) walks every site
at several call counts (:func:`full_points`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import load_config
from harness.iterate import planned_stages
from harness.rundir import DONE, KEY, MANIFEST, OLD, output_digest, output_digests
from pipeline import faults
from test_end_to_end import write_config

FULL = os.environ.get("HUMPBACK_KILL_SWEEP", "").lower() == "full"

SHORT = [
    "io.replace@seed:1",                      # data preparation, a file half in place
    "train.step@backward:2",                  # backward model mid-epoch (checkpoint-1 on disk)
    "chunk.committed@augment:5",              # generation between chunks
    "train.checkpoint@iter_00/finetune:2",    # fine-tuning while checkpoint-2 is half saved
    "eval.judged@iter_00/eval:1",             # evaluation between AlpacaEval and held-out tasks
    "chunk.committed@iter_01/curate:1",       # curation between chunks
    "h2h.opponent@iter_01/head_to_head:1",    # head to head, judged but not summarised
    "report.markdown:1",                      # report.md written, report.html not
    "mlflow.metrics:2",                       # a child run's metrics logged, its fingerprint not
]
"""The short sweep, in the order the loop reaches them."""

def sweep_config(tmp_path: Path, model: Path) -> Path:
    """The end-to-end tests' tiny config with one iteration and a trainer checkpoint every step."""
    return write_config(tmp_path, model, iterate={"iterations": 1}, backward={"save_steps": 1},
                        finetune={"save_steps": 1})


def full_points(stages: list[str]) -> list[str]:
    """Every site at the call counts a resumed run reaches next, in the loop's order."""
    points: list[str] = []
    for stage in stages:
        kind = stage.split("/")[-1]
        if kind in ("seed", "corpus", "select"):
            points += [f"io.replace@{stage}:1", f"io.replace@{stage}:2"]
        elif kind == "judge_check":
            points += [f"judge_check.planted@{stage}:1", f"io.replace@{stage}:1"]
        elif kind == "eval":
            points += [f"eval.answers@{stage}:1", f"eval.judged@{stage}:1", f"eval.heldout@{stage}:1",
                       f"io.replace@{stage}:1"]
        elif kind in ("backward", "finetune"):
            # step 1 (nothing saved), step 2 (checkpoint-1 saved), checkpoint-2 half saved, then
            # a step of the run that must resume from checkpoint-1 past the broken checkpoint-2
            points += [f"train.step@{stage}:1", f"train.step@{stage}:2", f"train.checkpoint@{stage}:1",
                       f"train.step@{stage}:1"]
        elif kind in ("augment", "curate"):
            # after the first chunk, in the middle of writing the next, after it; augmentation's
            # 12 chunks (curation has 3) leave room for one more after two new ones
            points += [f"chunk.committed@{stage}:1", f"io.replace@{stage}:1", f"chunk.committed@{stage}:1"]
            points += [f"chunk.committed@{stage}:2"] if kind == "augment" else []
        elif kind == "head_to_head":
            points += [f"h2h.opponent@{stage}:1"]
        points += [f"commit.before@{stage}:1", f"commit.after@{stage}:1"]
    points += ["report.plots:1", "report.markdown:1", "mlflow.parent:1", "mlflow.metrics:1", "mlflow.child:1",
               "mlflow.metrics:1", "mlflow.child:2"]
    return points


# --------------------------------------------------------------------------- running and killing


def _start(cfg_path: Path, run_dir: Path, log: Path, kill: str | None, mark: Path, *overrides: str,
           **env_extra: str) -> subprocess.Popen:
    """``humpback iterate`` in a process group of its own, killed at ``kill`` when given."""
    env = {k: v for k, v in os.environ.items() if k not in (faults.KILL_ENV, faults.FAULT_ENV)}
    env.update(PYTHONUNBUFFERED="1", **{faults.MARK_ENV: str(mark)}, **env_extra)
    if kill:
        env[faults.KILL_ENV] = kill
    cmd = [sys.executable, "-m", "harness.cli", "iterate", "--config", str(cfg_path), "--run-dir", str(run_dir),
           *overrides]
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=900)
    finally:
        try:  # anything the loop started goes with it (the fault site kills the group too)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(cfg_path: Path, run_dir: Path, log: Path, kill: str | None, mark: Path) -> int:
    return _wait(_start(cfg_path, run_dir, log, kill, mark))


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:]


def _marks(mark: Path) -> list[dict]:
    return [json.loads(line) for line in mark.read_text().splitlines()] if mark.exists() else []


def _spec(point: str) -> tuple[str, str | None, int]:
    where, _, n = point.partition(":")
    site, _, stage = where.partition("@")
    return site, stage or None, int(n)


def committed(run_dir: Path) -> dict[str, dict]:
    """Every committed stage (a folder with ``.done`` that is not a ``.partial`` one) -> manifest,
    after checking that it is whole: manifest and ``.done`` agree on the cache key, and every file
    is the file the manifest names (sha256), nothing missing, nothing extra."""
    out = {}
    for done in sorted(run_dir.rglob(DONE)):
        stage = done.parent
        name = stage.relative_to(run_dir).as_posix()
        if any(part.endswith((".partial", ".shared", OLD)) for part in stage.relative_to(run_dir).parts):
            continue
        manifest = json.loads((stage / MANIFEST).read_text())
        assert manifest["stage"] == name
        assert done.read_text().strip() == manifest["cache_key"] == (stage / KEY).read_text().strip(), name
        files = output_digests(stage)
        assert files == manifest["outputs"], f"{name}: files differ from its manifest"
        assert output_digest(files) == manifest["output_digest"], name
        out[name] = manifest
    return out


def assert_only_committed_stages_exist(run_dir: Path, stages: list[str]) -> None:
    """A stage folder under its final name is always a committed one."""
    for name in stages:
        if (run_dir / name).exists():
            assert (run_dir / name / DONE).exists(), f"{name} exists under its final name without .done"


def kill_chain(cfg_path: Path, run_dir: Path, points: list[str], logs: Path) -> list[dict]:
    """Run the loop once per point, each killed there, checking the run directory after each."""
    logs.mkdir(parents=True, exist_ok=True)
    stages = planned_stages(load_config(cfg_path))
    killed = []
    for i, point in enumerate(points):
        log, mark = logs / f"{i:02d}.log", logs / f"{i:02d}.mark"
        before = set(committed(run_dir)) if run_dir.exists() else set()
        started = time.time()
        rc = _launch(cfg_path, run_dir, log, point, mark)
        marks = _marks(mark)
        site, stage, n = _spec(point)
        assert rc == -signal.SIGKILL and len(marks) == 1, f"{point}: not killed there (exit {rc}):\n{_tail(log)}"
        assert (marks[0]["site"], marks[0]["n"]) == (site, n) and (stage is None or marks[0]["stage"] == stage)
        after = committed(run_dir)  # every committed stage whole
        assert_only_committed_stages_exist(run_dir, stages)
        assert before <= set(after), f"{point}: a committed stage was lost"
        if stage is not None:
            assert (stage in after) == (site == "commit.after"), f"{point}: {stage} committed: {stage in after}"
        killed.append({"point": point, "seconds": round(time.time() - started, 1), "log": log})
    return killed


def finish(cfg_path: Path, run_dir: Path, logs: Path) -> str:
    log = logs / "final.log"
    rc = _launch(cfg_path, run_dir, log, None, logs / "final.mark")
    assert rc == 0, _tail(log)
    return log.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------- the checks at the end


TIMED = ("summary.json", "*/annotations.json", "*/alpaca_eval.json", "heldout/results.json", "heldout/summary.json",
         "judge_cache/*")
"""Files of the evaluation stages that record when, how fast, where or from which cache they were
made (alpaca_eval's annotation dates and times, lm-eval's dates and paths, the stage's seconds):
their digests differ between any two runs, so their content is compared without those fields."""
EVALUATION = ("judge_check", "eval", "head_to_head")


def _timed(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TIMED)


def _judgments(path: Path) -> list[tuple]:
    rows = json.loads(path.read_text())
    return sorted((r["instruction"], r["output_1"], r["output_2"], r["preference"]) for r in rows)


def assert_same_outputs(reference: Path, resumed: Path, stages: list[str]) -> None:
    """Every stage's output digest equals the uninterrupted run's. Evaluation stages are not
    deterministic byte for byte (see :data:`TIMED`): there every other file's digest, the
    judgments (instruction, answers, preference) and the summary less its wall time."""
    ref, got = committed(reference), committed(resumed)
    assert set(got) == set(ref) == set(stages)
    for name in stages:
        if name.split("/")[-1] not in EVALUATION:
            assert ref[name]["output_digest"] == got[name]["output_digest"], (name, _differing(ref, got, name))
            continue
        a = {k: v for k, v in ref[name]["outputs"].items() if not _timed(k) and not k.startswith("logs/")}
        b = {k: v for k, v in got[name]["outputs"].items() if not _timed(k) and not k.startswith("logs/")}
        assert a == b, (name, _differing(ref, got, name))
        assert set(ref[name]["outputs"]) == set(got[name]["outputs"]), name
        for file in ref[name]["outputs"]:
            if fnmatch.fnmatch(file, "*annotations.json"):
                assert _judgments(reference / name / file) == _judgments(resumed / name / file), (name, file)
        if name.endswith("/eval"):
            summaries = [json.loads((root / name / "summary.json").read_text()) for root in (reference, resumed)]
            assert summaries[0] | {"seconds": None} == summaries[1] | {"seconds": None}, name


def _differing(ref: dict, got: dict, name: str) -> list[str]:
    a, b = ref[name]["outputs"], got[name]["outputs"]
    return sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))


def assert_training_resumed(run_dir: Path, killed: list[dict]) -> None:
    """A training stage killed after checkpoint-1 was saved resumed from it, not from scratch."""
    manifests = committed(run_dir)
    for k in killed:
        site, stage, n = _spec(k["point"])
        if site == "train.step" and n >= 2 or site == "train.checkpoint":
            resumed = manifests[stage]["stats"]["resumed_from"]
            assert resumed and Path(resumed).name == "checkpoint-1", (k["point"], resumed)
            assert manifests[stage]["stats"]["steps"] == 3


def assert_mlflow_whole(run_dir: Path, models: set[str]) -> None:
    """One parent run for the run directory, one child per model, each with its fingerprint, and
    no metric logged twice by the runs that were killed while logging."""
    import mlflow

    from harness.mlflow_records import TAG_FINGERPRINT, TAG_ITERATION, TAG_RUN_DIR

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    mine = [r for r in runs if r.data.tags.get(TAG_RUN_DIR) == str(run_dir.resolve())]
    parents = [r for r in mine if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags[TAG_ITERATION]: r for r in mine if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and set(children) == models
    for name, child in children.items():
        assert child.data.tags.get(TAG_FINGERPRINT) and child.info.status == "FINISHED", name
        for key in child.data.metrics:
            assert len(client.get_metric_history(child.info.run_id, key)) == 1, (name, key)


# --------------------------------------------------------------------------- the sweeps


STAGE_SCRIPT = """
import sys
from harness.rundir import RunDir
from pipeline.io import write_jsonl

root, text = sys.argv[1], sys.argv[2]

def fn(ctx):
    (ctx.work / "out.txt").write_text(text)
    write_jsonl(ctx.work / "rows.jsonl", [{"text": text, "i": i} for i in range(3)])
    return {"text": text}

RunDir(root).stage("a", fn, version="v1", settings={"text": text})
"""


def _one_stage(root: Path, text: str, kill: str | None = None, mark: Path | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in (faults.KILL_ENV, faults.FAULT_ENV)}
    if kill:
        env.update({faults.KILL_ENV: kill, faults.MARK_ENV: str(mark)})
    proc = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(root), text], env=env, capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


COMMIT_STEPS = ["io.replace", "commit.before", "commit.old_moved", "commit.after"]


@pytest.mark.parametrize("site", COMMIT_STEPS)
def test_a_stage_killed_at_each_commit_step_is_old_or_new_never_half(site, tmp_path):
    """One stage of the run directory alone, committed once ("one"), then recomputed under a new
    key ("two") and killed at each step of its commit: after the kill the stage is the old one or
    the new one, whole; the same command then leaves exactly the new one, with nothing aside."""
    clean = tmp_path / "clean"
    assert _one_stage(clean, "two") == 0
    root, mark = tmp_path / "run", tmp_path / "mark"
    assert _one_stage(root, "one") == 0
    assert _one_stage(root, "two", kill=f"{site}@a:1", mark=mark) == -signal.SIGKILL
    assert [m["site"] for m in _marks(mark)] == [site]
    after_kill = committed(root)
    if site == "commit.old_moved":  # the old folder aside, the new one complete but not in place
        assert after_kill == {} and (root / f"a{OLD}" / DONE).exists() and (root / "a.partial" / DONE).exists()
    else:
        assert after_kill["a"]["stats"]["text"] == ("two" if site == "commit.after" else "one")
    assert _one_stage(root, "two") == 0
    final = committed(root)
    assert final["a"]["stats"]["text"] == "two"
    assert final["a"]["output_digest"] == committed(clean)["a"]["output_digest"]  # no orphan, no mixture
    assert {p.name for p in root.iterdir()} == {"a"}


class Reference:
    """An uninterrupted run of the sweep's config, in a process of its own that runs while the
    killed ones do (its MLflow is off: it is not compared). It has its own model and judge cache
    (``HUMPBACK_CACHE``), so the two never write one cache file at the same time."""

    def __init__(self, tmp: Path, model: Path):
        self.root = tmp / "run"
        self.log = tmp / "reference.log"
        self.proc = _start(sweep_config(tmp, model), self.root, self.log, None, tmp / "reference.mark",
                           "tracking.uri=off", HUMPBACK_CACHE=str(tmp / "cache"))

    def wait(self) -> Path:
        rc = _wait(self.proc)
        assert rc == 0, _tail(self.log)
        return self.root


@pytest.fixture(scope="module")
def reference(tiny_model, eval_data, tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("kill-reference"), tiny_model)
    yield ref
    _wait(ref.proc)


def _sweep(points: list[str], reference: Reference, tiny_model: Path, tmp_path: Path) -> list[dict]:
    cfg_path = sweep_config(tmp_path, tiny_model)
    stages = planned_stages(load_config(cfg_path))
    run_dir = tmp_path / "killed"
    killed = kill_chain(cfg_path, run_dir, points, tmp_path / "logs")
    log = finish(cfg_path, run_dir, tmp_path / "logs")
    assert_same_outputs(reference.wait(), run_dir, stages)
    assert_training_resumed(run_dir, killed)
    assert_mlflow_whole(run_dir, {"base", "iter_00", "iter_01"})
    for name in ("report.md", "report.html"):
        text = (run_dir / name).read_text(encoding="utf-8")
        assert "iter_01" in text and not list(run_dir.glob(f"{name}.tmp*")), name
    assert (run_dir / "report.html").read_text().endswith("</html>\n")
    print(f"\nkill sweep: {len(killed)} kill points, then resumed to the end; seconds per killed process: "
          f"{[k['seconds'] for k in killed]}; final log {len(log)} chars")
    return killed


def test_the_sweeps_cover_every_site_and_every_stage():
    stages = planned_stages(load_config(None, ["iterate.iterations=1"]))
    kinds = {"seed", "backward", "augment", "finetune", "eval", "curate", "head_to_head"}
    assert {s.split("/")[-1] for s in (_spec(p)[1] for p in SHORT) if s} == kinds
    assert {_spec(p)[0] for p in SHORT} >= {"report.markdown", "mlflow.metrics", "train.step", "train.checkpoint"}
    full = full_points(stages)
    assert {_spec(p)[1] for p in full} - {None} == set(stages)
    assert {_spec(p)[0] for p in full} | set(COMMIT_STEPS) == set(faults.SITES)


@pytest.mark.slow
@pytest.mark.skipif(FULL, reason="the full sweep runs instead")
def test_short_kill_sweep(reference, tiny_model, tmp_path):
    killed = _sweep(SHORT, reference, tiny_model, tmp_path)
    assert len(killed) == len(SHORT)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="set HUMPBACK_KILL_SWEEP=full (make test-kill)")
def test_full_kill_sweep(reference, tiny_model, tmp_path):
    cfg = load_config(sweep_config(tmp_path, tiny_model))
    points = full_points(planned_stages(cfg))
    killed = _sweep(points, reference, tiny_model, tmp_path)
    assert len(killed) == len(points)
