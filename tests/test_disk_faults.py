"""A run that cannot write: the disk fills up or turns read-only at a chosen point.

We run as root, so file permissions stop nothing; the faults are made at the write itself. Either
Python's ``open`` is replaced so that writing one chosen file fails after part of it is on disk
(``No space left on device``, as a full disk does), or a fault site of :mod:`pipeline.faults`
raises the OS error (``HUMPBACK_FAULT_AT``). Each time the command must stop with exit status 6
and a message naming the file and the OS's reason, commit nothing unfinished, and a later run with
room must redo exactly the stage that was cut short and end with the same outputs as a run that
never failed.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import EXIT_WRITE, main
from harness.rundir import DONE, MANIFEST, output_digest, output_digests
from pipeline import faults
from test_end_to_end import write_config

AUGMENT_CHUNKS = 12  # the tiny config's 12 segments, one per chunk


# --------------------------------------------------------------------------- faults at the write


class _FullDisk:
    """A file that takes half of the first write and then reports the disk full."""

    def __init__(self, fh, path: str, code: int):
        self._fh, self._path, self._code = fh, path, code

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(self._code, os.strerror(self._code), self._path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False

    def __getattr__(self, name):
        return getattr(self._fh, name)


def fail_writes(monkeypatch, pattern: str, code: int = errno.ENOSPC) -> list[str]:
    """Make every write to a file whose name matches ``pattern`` fail with ``code`` (after half
    its first write reached the disk); returns the paths that failed."""
    real_open = builtins.open
    failed: list[str] = []

    def opener(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                and fnmatch.fnmatch(Path(file).name, pattern):
            failed.append(os.fspath(file))
            return _FullDisk(fh, os.fspath(file), code)
        return fh

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)  # pathlib's write_text opens through io.open
    return failed


def stage_runs(caplog) -> dict[str, str]:
    """stage -> what the run did with it (``cached``, ``running``, ``committing``), from the log."""
    out = {}
    for record in caplog.records:
        msg = record.getMessage()
        if record.name == "harness.rundir" and msg.startswith("stage "):
            name, rest = msg[6:].split(": ", 1)
            out.setdefault(name, rest.split(" ")[0].rstrip(","))
    return out


def whole(stage: Path) -> dict:
    """The manifest of a committed stage whose files are exactly those it names."""
    manifest = json.loads((stage / MANIFEST).read_text())
    files = output_digests(stage)
    assert files == manifest["outputs"] and output_digest(files) == manifest["output_digest"]
    return manifest


# --------------------------------------------------------------------------- a run up to augmentation


@pytest.fixture(scope="module")
def prepared(tiny_model, eval_data, tmp_path_factory):
    """A run with seed, corpus and backward committed (evaluation off: these tests are about the
    pipeline's writes), and the augment stage's digest from an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("disk")
    cfg = write_config(tmp, tiny_model, eval={"enabled": False}, gate={"enabled": False})
    base = tmp / "base"
    assert main(["stage", "backward", "--config", str(cfg), "--run-dir", str(base)]) == 0
    clean = tmp / "clean"
    shutil.copytree(base, clean)
    assert main(["stage", "augment", "--config", str(cfg), "--run-dir", str(clean)]) == 0
    return cfg, base, whole(clean / "augment")["output_digest"]


def _copy(prepared, tmp_path) -> tuple[list[str], Path]:
    cfg, base, _ = prepared
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return ["--config", str(cfg), "--run-dir", str(run)], run


def _redo(args: list[str], run: Path, caplog, digest: str) -> dict[str, str]:
    """Run augment again with room on the disk: only augment runs, and ends as the clean run did."""
    caplog.clear()
    assert main(["stage", "augment", *args]) == 0
    runs = stage_runs(caplog)
    assert {runs[s] for s in ("seed", "corpus", "backward")} == {"cached"}, runs
    assert whole(run / "augment")["output_digest"] == digest
    assert not (run / "augment.partial").exists()
    return runs


@pytest.mark.slow
def test_disk_full_mid_chunk(prepared, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO)
    args, run = _copy(prepared, tmp_path)
    failed = fail_writes(monkeypatch, "00004.jsonl.tmp*")
    assert main(["stage", "augment", *args]) == EXIT_WRITE
    err = capsys.readouterr().err
    assert failed and f"cannot write {failed[0]}: No space left on device (ENOSPC)" in err
    assert "while stage augment was running" in err and "Traceback" not in err
    assert not (run / "augment").exists() and not (run / "augment.partial" / DONE).exists()
    chunks = run / "augment.partial" / "_scratch" / "progress" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == [f"{i:05d}.jsonl" for i in range(4)]  # no half chunk
    monkeypatch.undo()
    runs = _redo(args, run, caplog, prepared[2])
    assert runs["augment"] == "running"
    assert "augment: reusing 4 chunk(s)" in caplog.text


@pytest.mark.slow
def test_read_only_at_stage_commit(prepared, tmp_path, monkeypatch, caplog, capsys):
    """The file system turns read-only as the finished stage is about to be renamed into place:
    the next run commits it without computing it again."""
    caplog.set_level(logging.INFO)
    args, run = _copy(prepared, tmp_path)
    monkeypatch.setenv(faults.FAULT_ENV, "commit.before@augment:1:EROFS")
    faults.reset_counts()
    assert main(["stage", "augment", *args]) == EXIT_WRITE
    err = capsys.readouterr().err
    assert f"cannot write {run / 'augment.partial'}: Read-only file system (EROFS)" in err
    assert not (run / "augment").exists() and (run / "augment.partial" / DONE).exists()
    monkeypatch.delenv(faults.FAULT_ENV)
    runs = _redo(args, run, caplog, prepared[2])
    assert runs["augment"] == "finished"  # "finished before a crash, committing": nothing recomputed
    assert "augment: reusing" not in caplog.text


@pytest.mark.slow
def test_disk_full_writing_the_manifest(prepared, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO)
    args, run = _copy(prepared, tmp_path)
    failed = fail_writes(monkeypatch, "manifest.json.tmp*")
    assert main(["stage", "augment", *args]) == EXIT_WRITE
    assert failed and failed[0].startswith(str(run / "augment.partial"))
    assert f"cannot write {failed[0]}: No space left on device" in capsys.readouterr().err
    partial = run / "augment.partial"
    assert not (run / "augment").exists() and not (partial / DONE).exists() and not (partial / MANIFEST).exists()
    assert not [p for p in partial.iterdir() if ".tmp" in p.name]  # the half-written manifest is gone
    monkeypatch.undo()
    assert _redo(args, run, caplog, prepared[2])["augment"] == "running"


@pytest.mark.slow
def test_disk_full_writing_the_report(prepared, tmp_path, monkeypatch, capsys):
    """``humpback report`` and the end of ``humpback iterate`` stop with exit status 6 when the
    report cannot be written, and the report that was there stays whole."""
    args, run = _copy(prepared, tmp_path)
    assert main(["report", str(run), "--no-mlflow"]) == 0
    before = (run / "report.md").read_text()
    failed = fail_writes(monkeypatch, "report.md.tmp*")
    assert main(["report", str(run), "--no-mlflow"]) == EXIT_WRITE
    assert f"cannot write {failed[0]}: No space left on device" in capsys.readouterr().err
    assert (run / "report.md").read_text() == before and not list(run.glob("report.md.tmp*"))
    assert main(["stage", "augment", *args]) == 0  # a stage command writes no report
    assert main(["iterate", *args, "iterate.iterations=0", "tracking.uri=off"]) == EXIT_WRITE
    assert (run / "report.md").read_text() == before and (run / "iter_00" / "finetune" / DONE).exists()


# --------------------------------------------------------------------------- the fault sites themselves


def test_checkpoint_does_nothing_unless_asked(monkeypatch):
    monkeypatch.delenv(faults.KILL_ENV, raising=False)
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    faults.checkpoint("no.such.site")  # not even looked at: one dictionary lookup and out
    monkeypatch.setenv(faults.FAULT_ENV, "io.replace:1:ENOSPC")
    with pytest.raises(ValueError, match="unknown fault site"):
        faults.checkpoint("no.such.site")


def test_fault_fires_at_the_nth_call_of_its_site_in_its_stage(monkeypatch, tmp_path):
    mark = tmp_path / "mark"
    monkeypatch.setenv(faults.FAULT_ENV, "chunk.committed@augment:2:EDQUOT")
    monkeypatch.setenv(faults.MARK_ENV, str(mark))
    faults.reset_counts()
    faults.checkpoint("chunk.committed", "x")  # outside any stage: not counted
    with faults.stage_scope("curate"):
        faults.checkpoint("chunk.committed", "x")
    with faults.stage_scope("augment"):
        faults.checkpoint("chunk.committed", "a")
        faults.checkpoint("io.replace", "b")
        with pytest.raises(OSError) as caught:
            faults.checkpoint("chunk.committed", "c")
    assert (caught.value.errno, caught.value.filename) == (errno.EDQUOT, "c")
    assert json.loads(mark.read_text()) == {"action": "fault", "site": "chunk.committed", "stage": "augment", "n": 2,
                                            "pid": os.getpid(), "path": "c"}
    faults.checkpoint("chunk.committed", "d")  # the third call: nothing


def test_kill_ends_the_process_at_its_site(tmp_path):
    script = ("from pipeline import faults\n"
              "for i in range(5):\n"
              "    print(i, flush=True)\n"
              "    faults.checkpoint('train.step')\n")
    env = {**os.environ, faults.KILL_ENV: "train.step:3", faults.MARK_ENV: str(tmp_path / "mark")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and proc.stdout.split() == ["0", "1", "2"]
    assert json.loads((tmp_path / "mark").read_text())["n"] == 3


def test_write_error_finds_the_disk_in_any_exception():
    assert faults.write_error(OSError(errno.ENOENT, "gone")) is None
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y")
    assert faults.write_error(wrapped).filename == "/x/y"
    # safetensors reports a full disk in its own exception type, with the OS's words
    found = faults.write_error(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                                         'device" })'))
    assert found.errno == errno.ENOSPC and found.filename is None


# --------------------------------------------------------------------------- known holes elsewhere


def test_a_judge_cache_cut_short_is_not_fatal(tmp_path):
    from evals import alpaca

    cache = tmp_path / "judge_cache.json"
    cache.write_text('[{"instruction": "a", "output_1": "b", "output_2": "c", "preference": 1.0}, {"instr')
    alpaca.Judge("humpback_longest_fake").annotator(caching_path=cache)
    kept = list(tmp_path.glob("judge_cache.json.unreadable-*"))
    assert not cache.exists() and len(kept) == 1 and kept[0].read_text().endswith('{"instr')


def test_the_judge_cache_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import pandas as pd

    from evals import alpaca

    cache = tmp_path / "judge_cache.json"
    annotator = alpaca.Judge("humpback_longest_fake").annotator(caching_path=cache)
    rows = pd.DataFrame([{"instruction": "i", "output_1": "short", "output_2": "much longer"}])
    annotator.annotate_pairs(rows)
    before = cache.read_text()
    assert '"preference"' in before

    # the disk fills up once the new cache is written out, before it replaces the old one
    monkeypatch.setenv(faults.FAULT_ENV, "io.replace:1:ENOSPC")
    faults.reset_counts()
    with pytest.raises(OSError):
        annotator.save()
    assert cache.read_text() == before and list(tmp_path.iterdir()) == [cache]
