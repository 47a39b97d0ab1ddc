import json
import platform
import sys

import pytest

from harness.rundir import DONE, MANIFEST, RunDir


def _writer(calls, text="x"):
    def fn(ctx):
        calls.append(ctx.name)
        (ctx.work / "out.txt").write_text(text)
        (ctx.scratch / "tmp.bin").write_text("not an output")
        return {"n": 1}

    return fn


def test_stage_runs_once_then_skips(tmp_path):
    run = RunDir(tmp_path)
    calls = []
    a = run.stage("a", _writer(calls), version="v1", settings={"k": 1})
    b = run.stage("a", _writer(calls), version="v1", settings={"k": 1})
    assert calls == ["a"] and b.skipped and a.digest == b.digest
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert list(manifest["outputs"]) == ["out.txt"]  # scratch is not an output
    assert not (tmp_path / "a" / "_scratch").exists()
    assert manifest["stats"] == {"n": 1} and manifest["seconds"] >= 0


def test_changed_setting_reruns_stage_and_downstream_only(tmp_path):
    run = RunDir(tmp_path)
    calls = []
    up = run.stage("up", _writer(calls, "u"), version="v1", settings={})
    mid = run.stage("mid", _writer(calls, "m1"), version="v1", settings={"k": 1}, inputs={"up": up})
    run.stage("down", _writer(calls), version="v1", settings={}, inputs={"mid": mid})
    calls.clear()
    up = run.stage("up", _writer(calls, "u"), version="v1", settings={})
    mid = run.stage("mid", _writer(calls, "m2"), version="v1", settings={"k": 2}, inputs={"up": up})
    run.stage("down", _writer(calls), version="v1", settings={}, inputs={"mid": mid})
    assert calls == ["mid", "down"]


def test_same_output_after_rerun_keeps_downstream_cached(tmp_path):
    run = RunDir(tmp_path)
    calls = []
    mid = run.stage("mid", _writer(calls, "same"), version="v1", settings={"k": 1})
    run.stage("down", _writer(calls), version="v1", settings={}, inputs={"mid": mid})
    calls.clear()
    mid = run.stage("mid", _writer(calls, "same"), version="v2", settings={"k": 1})
    run.stage("down", _writer(calls), version="v1", settings={}, inputs={"mid": mid})
    assert calls == ["mid"]


def test_crash_leaves_nothing_taken_as_finished(tmp_path):
    run = RunDir(tmp_path)

    def boom(ctx):
        (ctx.work / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.stage("a", boom, version="v1", settings={})
    assert not (tmp_path / "a").exists() and run.load("a") is None
    assert (tmp_path / "a.partial" / "half.txt").exists()  # kept for the retry with the same key
    calls = []
    result = run.stage("a", _writer(calls), version="v1", settings={})
    assert calls == ["a"] and (result.path / DONE).exists()
    assert not (tmp_path / "a.partial").exists()


def test_partial_with_other_key_is_discarded(tmp_path):
    run = RunDir(tmp_path)
    seen = []

    def crash(ctx):
        (ctx.scratch / "chunk").write_text("old")
        raise RuntimeError

    with pytest.raises(RuntimeError):
        run.stage("a", crash, version="v1", settings={"k": 1})

    def check(ctx):
        seen.append((ctx.scratch / "chunk").exists())
        return {}

    run.stage("a", check, version="v1", settings={"k": 2})
    assert seen == [False]


def test_finished_partial_is_committed_without_rerun(tmp_path):
    run = RunDir(tmp_path)
    calls = []
    run.stage("a", _writer(calls), version="v1", settings={})
    # Simulate a crash between removing the old folder and the rename: the work is complete.
    (tmp_path / "a").rename(tmp_path / "a.partial")
    run.stage("a", _writer(calls), version="v1", settings={})
    assert calls == ["a"] and (tmp_path / "a" / DONE).exists()


def test_manifest_records_the_stage_peak_memory(tmp_path):
    import numpy as np

    run = RunDir(tmp_path)

    def big(ctx):
        # 100 MiB, touched: above glibc's largest mmap threshold (32 MiB), so it is fresh memory
        # even in a process whose heap already holds freed pages
        block = np.ones(100 * 2**20 // 8)
        (ctx.work / "out.txt").write_text(str(block.sum()))
        return {}

    def small(ctx):
        (ctx.work / "out.txt").write_text("x")
        return {}

    a = run.stage("big", big, version="v1", settings={})
    b = run.stage("small", small, version="v1", settings={})
    assert a.manifest["peak_rss_mib"] > 0 and b.manifest["peak_rss_mib"] > 0
    if a.manifest["peak_rss_scope"] == "stage":  # Linux: each stage its own window
        assert a.manifest["peak_rss_mib"] - b.manifest["peak_rss_mib"] > 80


_PINNED: list = []


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="heap trimming is glibc's")
def test_memory_a_stage_freed_is_returned_before_the_next_stage(tmp_path):
    """Freed heap pages below glibc's mmap threshold stay resident unless trimmed: the stage
    manifest's memory after the stage must be back near where the stage started."""
    run = RunDir(tmp_path)

    def churn(ctx):
        big = b"x" * (30 * 2**20)  # freeing it raises glibc's mmap threshold to 30 MiB
        del big
        blocks = [b"x" * 2**20 for _ in range(200)]  # 200 MiB of 1 MiB blocks, now on the heap
        _PINNED.append(b"y" * 2**20)  # allocated after them, kept: the heap cannot shrink from its top
        del blocks
        (ctx.work / "out.txt").write_text("x")
        return {}

    try:
        m = run.stage("churn", churn, version="v1", settings={}).manifest
    finally:
        _PINNED.clear()
    assert m["peak_rss_mib"] - m["rss_start_mib"] > 150  # the blocks were resident during the stage
    assert m["rss_end_mib"] - m["rss_start_mib"] < 50, m


class _FakeCuda:
    """Stands in for ``torch.cuda`` in a process that has used a GPU."""

    def __init__(self):
        self.calls, self.reserved = [], [0, 0]

    def device_count(self):
        return 2

    def reset_peak_memory_stats(self, device):
        self.calls.append(f"reset {device}")

    def max_memory_reserved(self, device):
        return self.reserved[device]

    def empty_cache(self):
        self.calls.append("empty_cache")


def test_stage_records_its_gpu_peak_and_returns_cached_gpu_memory(tmp_path, monkeypatch):
    from pipeline import memory

    run = RunDir(tmp_path)
    assert run.stage("cpu", lambda ctx: {}, version="v1", settings={}).manifest["gpu_peak_mib"] is None
    cuda = _FakeCuda()
    monkeypatch.setattr(memory, "_cuda", lambda: cuda)

    def on_gpu(ctx):
        assert cuda.calls == ["reset 0", "reset 1"]  # the window starts with the stage, on every GPU
        cuda.reserved = [2**30, 3 * 2**30]  # the model ran on cuda:1
        return {}

    manifest = run.stage("gpu", on_gpu, version="v1", settings={}).manifest
    assert manifest["gpu_peak_mib"] == 3072.0
    assert cuda.calls == ["reset 0", "reset 1", "empty_cache"]  # cached blocks go back before the next stage


def _hold_lock_in_another_process(root):
    """A child process that takes the run directory's lock and sleeps; returns once it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from harness.rundir import RunDir; "
         f"RunDir({str(root)!r}).lock(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_until_the_first_is_killed(tmp_path):
    """Two runs, one directory: the second process is refused with a message naming the first;
    after the first is killed (SIGKILL: no clean-up runs), the directory is free again."""
    import signal

    from harness.rundir import RunDirBusy

    root = tmp_path / "run"
    holder = _hold_lock_in_another_process(root)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by another process \(.*\"pid\": {holder.pid}"):
            RunDir(root).lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunDir(root).lock()  # the killed process left the file, not the lock
    RunDir(root).lock()  # and this process may ask again


def test_cli_refuses_a_busy_run_directory(tmp_path, capsys):
    from harness.cli import EXIT_BUSY, main

    root = tmp_path / "run"
    holder = _hold_lock_in_another_process(root)
    try:
        assert main(["iterate", "--run-dir", str(root), "eval.enabled=false"]) == EXIT_BUSY
        assert "in use by another process" in capsys.readouterr().err
        assert not (root / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
