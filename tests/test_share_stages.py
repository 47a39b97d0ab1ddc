"""Runs sharing committed stages (run.share_stages_from): taken only under exactly the same key."""

from __future__ import annotations

import json
import os

from harness.rundir import DONE, MANIFEST, RunDir


def _writer(calls, text="x"):
    def fn(ctx):
        calls.append(ctx.name)
        (ctx.work / "out.txt").write_text(text)
        return {"n": len(text)}

    return fn


def _source(tmp_path):
    source = RunDir(tmp_path / "source")
    up = source.stage("up", _writer([], "u"), version="v1", settings={"k": 1})
    source.stage("mid", _writer([], "m"), version="v1", settings={"k": 1}, inputs={"up": up})
    return source


def test_a_shared_stage_is_reused_and_one_with_another_key_is_computed(tmp_path):
    source = _source(tmp_path)
    run = RunDir(tmp_path / "run", share_from=[tmp_path / "missing", source.root])
    calls = []
    up = run.stage("up", _writer(calls, "u"), version="v1", settings={"k": 1})
    mid = run.stage("mid", _writer(calls, "m2"), version="v1", settings={"k": 2}, inputs={"up": up})
    assert calls == ["mid"]  # up was taken from the source, mid's settings differ
    assert up.skipped and up.path == run.root / "up" and (up.path / DONE).exists()
    assert up.digest == source.load("up").digest
    assert (up.path / "out.txt").read_text() == "u"
    assert os.path.samefile(up.path / "out.txt", source.root / "up" / "out.txt")  # a hard link
    assert up.manifest["reused_from"]["run_dir"] == str(source.root)
    assert up.manifest["reused_from"]["seconds"] == source.load("up").manifest["seconds"]
    assert json.loads((source.root / "up" / MANIFEST).read_text()).get("reused_from") is None  # untouched
    assert (mid.path / "out.txt").read_text() == "m2" and "reused_from" not in mid.manifest
    # the taken stage is now this run's own: a rerun skips it without looking elsewhere
    again = RunDir(run.root).stage("up", _writer(calls, "u"), version="v1", settings={"k": 1})
    assert calls == ["mid"] and again.skipped


def test_a_changed_input_or_version_is_never_taken(tmp_path):
    source = _source(tmp_path)
    run = RunDir(tmp_path / "run", share_from=[source.root])
    calls = []
    up = run.stage("up", _writer(calls, "other"), version="v2", settings={"k": 1})  # another version
    run.stage("mid", _writer(calls, "m"), version="v1", settings={"k": 1}, inputs={"up": up})  # another input
    assert calls == ["up", "mid"]


def test_a_source_whose_files_no_longer_match_is_passed_over(tmp_path):
    source = _source(tmp_path)
    out = source.root / "up" / "out.txt"
    out.unlink()
    out.write_text("edited after the commit")
    calls = []
    result = RunDir(tmp_path / "run", share_from=[source.root]).stage("up", _writer(calls, "u"), version="v1",
                                                                      settings={"k": 1})
    assert calls == ["up"] and "reused_from" not in result.manifest
    assert not (tmp_path / "run" / "up.shared").exists()


def test_a_run_never_shares_with_itself_or_unfinished_stages(tmp_path):
    source = RunDir(tmp_path / "source")
    (source.root / "up.partial").mkdir()
    calls = []
    run = RunDir(tmp_path / "source", share_from=[source.root])
    run.stage("up", _writer(calls), version="v1", settings={})
    assert calls == ["up"]
