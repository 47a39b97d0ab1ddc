"""harness.runview on small run directories built here: what is read, what is a gap, and that a
malformed file is an error that names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.runview import BASE, RunDirError, read_run
from conftest import write_file

WIN = "alpaca_eval/win_rate"


def _stage(root: Path, name: str, stats: dict, done: bool = True, **fields) -> None:
    write_file(root / name / "manifest.json", {"stage": name, "output_digest": f"d-{name}", "stats": stats, **fields})
    if done:
        (root / name / ".done").write_text("key")


def make_run(tmp_path: Path) -> Path:
    """seed, base, M0 and iteration 1 (curated, selected, trained, evaluated, gated)."""
    run = tmp_path / "run"
    write_file(run / "config.yaml", "run:\n  name: tiny\nmodel:\n  base: some/model\n")
    write_file(run / "env.json", {"git_commit": "abc123"})
    _stage(run, "seed", {"kept": 2}, seconds=0.5, started="2026-01-01T00:00:00")
    write_file(run / "seed" / "data.jsonl", [{"instruction": "ab", "response": "r" * 10},
                                         {"instruction": "abcd", "response": "r" * 30}])
    metric = {"value": 0.5, "stderr": 0.05, "n": 8, "higher_is_better": True, "trusted": False,
              "provenance": {"task_version": 1}}
    write_file(run / "base" / "eval" / "summary.json", {"metrics": {WIN: metric, "bare": 0.25},
                                                    "judge_check": {"accuracy": 0.75, "trusted": False},
                                                    "seconds": 3})
    _stage(run, "iter_00/finetune", {"train_pairs": 2, "final_loss": 1.5}, seconds=2.0, peak_rss_mib=1024.0,
           started="2026-01-01T00:00:02")
    (run / "iter_00" / "finetune" / "model").mkdir()
    _stage(run, "iter_01/curate", {"pairs": 4, "histogram": {"5": 3, "unscored": 1}, "unscored_rate": 0.25,
                                   "curator": {"precision": 0.5}}, started="2026-01-01T00:00:01")
    _stage(run, "iter_01/select", {"candidates": 4, "selected": 3, "keep_rate": 0.75, "contaminated": 0,
                                   "curator": {"precision": 0.9, "recall": 0.6},
                                   "quality": {"instruction_chars": {"mean": 12.0, "std": 1.5},
                                               "instruction_near_duplicate_rate": 0.0}})
    _stage(run, "iter_01/eval", {}, done=False)  # still running: a manifest in the folder, no .done
    write_file(run / "iter_01" / "gate.json", {"passed": False, "baseline": "best", "evaluated": False, "decisions": [
        {"check": "data/selected", "passed": False, "reason": "3 is below the minimum 5", "current": 3,
         "threshold": 5}]})
    return run


def test_every_piece_is_read_once_into_typed_records(tmp_path):
    view = read_run(make_run(tmp_path))
    assert list(view.models) == [BASE, "iter_00", "iter_01"] and view.problems == ()
    assert view.name == "tiny" and view.git_commit == "abc123" and view.config["model"]["base"] == "some/model"

    base = view.model(BASE)
    win = base.eval.metrics[WIN]
    assert (win.value, win.stderr, win.n, win.trusted, win.provenance) == (0.5, 0.05, 8, False, {"task_version": 1})
    assert base.eval.metrics["bare"].value == 0.25 and base.eval.metrics["bare"].trusted is True
    # a run made before judge calibration: its planted-pairs accuracy is read as such
    assert base.eval.judge_check.planted_accuracy == 0.75 and base.eval.judge_check.trusted is False
    assert base.eval.judge_check.human_accuracy is None
    assert base.eval.seconds == 3 and base.iteration is None and base.gate is None

    m0 = view.model("iter_00")
    assert m0.training == {"train_pairs": 2, "final_loss": 1.5} and m0.checkpoint and m0.iteration == 0
    assert m0.eval is None and m0.selection.selected is None and m0.curation.histogram == {}

    it = view.model("iter_01")
    assert it.curation.histogram == {"5": 3, "unscored": 1} and it.curation.unscored_rate == 0.25
    sel = it.selection
    assert (sel.candidates, sel.selected, sel.keep_rate, sel.contaminated) == (4, 3, 0.75, 0)
    assert sel.curator == {"precision": 0.9, "recall": 0.6} and sel.instruction_chars.mean == 12.0
    assert sel.response_chars.mean is None and sel.near_duplicate_rate == 0.0
    assert it.committed("select") and not it.committed("eval") and not it.committed("finetune")
    assert not it.checkpoint
    assert it.gate.passed is False and it.gate.evaluated is False and it.gate.baseline == "best"
    [decision] = it.gate.failures()
    assert (decision.check, decision.current, decision.threshold) == ("data/selected", 3, 5)

    assert view.stages["seed"].output_digest == "d-seed" and view.stages["iter_00/finetune"].peak_rss_mib == 1024.0
    # Stages that recorded no start come first, as they did in the report before.
    assert [s.name for s in view.stages_in_order()][-3:] == ["seed", "iter_01/curate", "iter_00/finetune"]
    assert view.model("iter_07").stages == {}  # not there yet: an empty model, not an error
    lengths = view.seed_lengths
    assert (lengths["instruction"].mean, lengths["instruction"].std) == (3.0, 1.0)
    assert lengths["response"].mean == 20.0


def test_an_empty_directory_is_all_gaps(tmp_path):
    view = read_run(tmp_path)
    assert list(view.models) == [BASE] and view.stages == {} and view.config == {} and view.env == {}
    assert view.name == tmp_path.name and view.seed_lengths == {}
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        read_run(tmp_path / "missing")


def test_a_malformed_manifest_names_the_file(tmp_path, caplog):
    run = make_run(tmp_path)
    bad = run / "iter_01" / "select" / "manifest.json"
    bad.write_text('{"stats": {"selected": 3', encoding="utf-8")  # half-written
    with pytest.raises(RunDirError) as err:
        read_run(run, strict=True)
    assert err.value.path == bad and str(err.value).startswith(f"{bad}: not valid JSON")

    view = read_run(run)  # not strict: left out, logged, listed
    assert [p.path for p in view.problems] == [bad] and str(bad) in caplog.text
    assert "iter_01/select" not in view.stages and view.model("iter_01").selection.selected is None
    assert view.model("iter_01").curation.pairs == 4  # the rest is still read


@pytest.mark.parametrize("name, content, problem", [
    ("iter_01/curate/manifest.json", {"stats": {"histogram": [1, 2]}}, "stats.histogram is list, not an object"),
    ("base/eval/summary.json", {"metrics": {WIN: {"value": "high"}}}, f"metric {WIN}: value 'high' is not a number"),
    ("base/eval/summary.json", "[1, 2]", "the file is list, not an object"),
    ("iter_01/gate.json", {"passed": True, "decisions": "all"}, "decisions is not a list of objects"),
])
def test_each_kind_of_malformed_file_names_file_and_field(tmp_path, name, content, problem):
    run = make_run(tmp_path)
    write_file(run / name, content)
    with pytest.raises(RunDirError, match="^" + re.escape(str(run / name))) as err:
        read_run(run, strict=True)
    assert err.value.problem == problem


def test_a_malformed_config_is_always_an_error(tmp_path):
    run = make_run(tmp_path)
    (run / "config.yaml").write_text("run: [unclosed\n", encoding="utf-8")
    with pytest.raises(RunDirError, match="config.yaml: not valid YAML"):
        read_run(run)


def test_a_malformed_seed_line_names_file_and_line(tmp_path):
    run = make_run(tmp_path)
    with open(run / "seed" / "data.jsonl", "a", encoding="utf-8") as fh:
        fh.write("not json\n")
    with pytest.raises(RunDirError, match=r"data.jsonl: line 3 is not valid JSON"):
        read_run(run).seed_lengths
