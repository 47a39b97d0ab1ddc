"""harness.report on hand-made run directories: complete, partial and empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from harness import report  # noqa: E402 - after the importorskip
from harness.gate import Metric  # noqa: E402
from harness.runview import read_run  # noqa: E402
from conftest import write_file

WIN = "alpaca_eval/win_rate"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _eval(win: float, trusted: bool = True) -> dict:
    prov = {"config_digest": "cfg", "task_version": 1}
    return {"model": "m", "metrics": {
        WIN: {"value": win, "stderr": 0.05, "n": 32, "higher_is_better": True, "trusted": trusted,
              "provenance": prov},
        "alpaca_eval/lc_win_rate": {"value": win - 0.1, "stderr": 0.07, "n": 32, "higher_is_better": True,
                                    "trusted": trusted, "provenance": {**prov, "lc_glm": "length_controlled_minimal"}},
        "ifeval/prompt_level_strict_acc": {"value": 0.25, "stderr": 0.01, "n": 32, "higher_is_better": True,
                                           "trusted": True, "provenance": prov},
    }, "judge_check": {"accuracy": 0.7, "position_bias": 0.1, "trusted": trusted, "n": 24}, "seconds": 3.0}


def make_run(root: Path, *, untrusted_last: bool = True) -> Path:
    """base, M0 and two iterations; iteration 2's judge is untrusted and its gate failed."""
    run = root / "demo"
    write_file(run / "config.yaml", "run:\n  name: demo\nselect:\n  k: 4.0\ncurate:\n  mode: logprob\n")
    write_file(run / "seed" / "data.jsonl", [{"instruction": "abcd", "response": "r" * 40, "origin": "seed"}] * 3)
    write_file(run / "base" / "eval" / "summary.json", _eval(0.30))
    for t in range(3):
        it = run / f"iter_{t:02d}"
        write_file(it / "finetune" / "manifest.json", {"stats": {"train_pairs": 3 + 2 * t, "final_loss": 2.0 - 0.25 * t},
                                                   "stage": f"iter_{t:02d}/finetune", "seconds": 10.0 + t,
                                                   "started": f"2026-01-0{3 - t}T00:00:00",  # last ran first
                                                   "peak_rss_mib": 1000.0 + 100 * t, "rss_start_mib": 512.0,
                                                   **({"rss_end_mib": 768.0} if t else {})})
        write_file(it / "eval" / "summary.json", _eval(0.40 + 0.1 * t, trusted=not (untrusted_last and t == 2)))
        if t == 0:
            continue
        hist = {"1": 1, "2": 0, "3": 2, "4": 3, "5": t, "unscored": 1}
        write_file(it / "curate" / "manifest.json", {"stats": {"pairs": 7 + t, "histogram": hist, "unscored_rate": 0.125}})
        quality = {"instruction_chars": {"mean": 20.0 + t, "std": 2.0}, "response_chars": {"mean": 300.0, "std": 9.0},
                   "instruction_distinct_2": 0.7, "instruction_near_duplicate_rate": 0.0}
        write_file(it / "select" / "manifest.json", {"stats": {"candidates": 8, "selected": 3 + t,
                                                           "keep_rate": (3 + t) / 8, "contaminated": 0,
                                                           "curator": {"precision": 0.8, "recall": 0.5},
                                                           "quality": quality}})
        decision = {"check": WIN, "passed": t == 1, "reason": "ok" if t == 1 else "refused: evaluator untrusted"}
        write_file(it / "gate.json", {"passed": t == 1, "baseline": "iter_00", "decisions": [decision]})
    return run


def _valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def test_full_report(tmp_path):
    run = make_run(tmp_path)
    out = report.write_report(run)
    assert out["columns"] == ["base", "iter_00", "iter_01", "iter_02"]
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| metric | base | iter_00 | iter_01 | iter_02 |" in md
    assert f"| {WIN} | 0.300 ± 0.050 | 0.400 ± 0.050 | 0.500 ± 0.050 | 0.600 ± 0.050 † |" in md
    assert "| keep rate | – | – | 0.500 | 0.625 |" in md
    assert "| score histogram | – | – | 1:1 2:0 3:2 4:3 5:1 ?:1 | 1:1 2:0 3:2 4:3 5:2 ?:1 |" in md
    assert "| instruction chars | – | – | 21.0 ± 2.0 | 22.0 ± 2.0 |" in md
    assert "| gate | – | – | passed | FAILED |" in md
    assert "† untrusted" in md and "- iter_02: alpaca_eval/win_rate: refused: evaluator untrusted" in md
    assert "| alpaca_eval/lc_win_rate | 0.200 ± 0.070 |" in md
    assert report.LC_GLM_NOTES["length_controlled_minimal"] in md
    assert "- peak memory: `1.17 GiB (iter_02/finetune)`" in md
    stages = md[md.index("## Stages"):].splitlines()
    assert stages[2:6] == ["| stage | seconds | peak GiB | at start GiB | after GiB |", "| --- | --- | --- | --- | --- |",
                           "| iter_02/finetune | 12.0 | 1.17 | 0.50 | 0.75 |", "| iter_01/finetune | 11.0 | 1.07 | 0.50 | 0.75 |"]
    assert stages[6] == "| iter_00/finetune | 10.0 | 0.98 | 0.50 | – |"  # a manifest without the field

    names = {p.name for p in out["plots"]}
    assert names == {"win_rate.png", "score_histograms.png", "keep_rate.png", "lengths.png"}
    for path in out["plots"]:
        assert path.parent == run / "plots" and f"](plots/{path.name})" in md
        _valid_png(path)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") == 4  # self-contained: no file references
    assert "<td>0.600 ± 0.050 †</td>" in page
    assert "<h2>Stages (time and resident memory)</h2>" in page and "<td>iter_02/finetune</td><td>12.0</td>" in page


def test_summary_table_for_the_terminal(tmp_path):
    text = report.summary_table(make_run(tmp_path))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "base", "iter_00", "iter_01", "iter_02"]
    win = next(line for line in lines if line.startswith(WIN))
    assert win.split("  ")[-1].strip() == "0.600 ± 0.050 †"
    assert any(line.split() == ["train", "pairs", "–", "3", "5", "7"] for line in lines)
    assert "gate failed: iter_02" in text
    assert report.LC_GLM_NOTES["length_controlled_minimal"] in text


def test_missing_pieces_render_as_dashes(tmp_path):
    run = make_run(tmp_path, untrusted_last=False)
    (run / "base" / "eval" / "summary.json").unlink()  # base never evaluated
    (run / "iter_02" / "eval" / "summary.json").unlink()  # iteration 2 still evaluating
    for stage in ("select", "finetune"):
        (run / "iter_02" / stage / "manifest.json").unlink()
    (run / "iter_02" / "gate.json").unlink()
    write_file(run / "iter_01" / "eval" / "summary.json", "{not json")  # half-written
    out = report.write_report(run)
    md = out["markdown"].read_text(encoding="utf-8")
    assert f"| {WIN} | – | 0.400 ± 0.050 | – | – |" in md
    assert "| keep rate | – | – | 0.500 | – |" in md
    assert "| gate | – | – | passed | – |" in md
    assert "†" not in md
    assert {p.name for p in out["plots"]} == {"win_rate.png", "score_histograms.png", "keep_rate.png", "lengths.png"}
    assert "iter_02" in report.summary_table(run)


def test_empty_run_dir_and_stale_plots(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "plots").mkdir()
    (run / "plots" / "win_rate.png").write_bytes(b"stale")
    out = report.write_report(run)
    assert out["plots"] == [] and not (run / "plots" / "win_rate.png").exists()
    md = out["markdown"].read_text(encoding="utf-8")
    assert "No evaluation results yet." in md and "| train pairs | – |" in md
    assert out["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "(no evaluation results yet)" in report.summary_table(run)


@pytest.mark.parametrize(
    "metric, cell",
    [
        (None, "–"),
        (Metric("m", None, 0.1), "–"),
        (Metric("m", 0.42), "0.420"),
        (Metric("m", 0.42, 0.05, trusted=False), "0.420 ± 0.050 †"),
        (Metric("m", 12.5, 0.25), "12.5 ± 0.2"),
        (Metric("m", float("nan"), 0.1), "–"),
    ],
)
def test_metric_cell(metric, cell):
    assert report.metric_cell(metric) == cell


def _stages(root: Path, manifests: dict[str, dict]) -> list:
    """The stages of a run directory holding these manifests, as the report orders them."""
    for i, (name, manifest) in enumerate(manifests.items()):
        write_file(root / name / "manifest.json", {"stage": name, "started": f"2026-01-01T00:00:0{i}", **manifest})
    return read_run(root).stages_in_order()


def test_stage_table_and_peak_show_the_gpu_only_where_one_was_used(tmp_path):
    cpu = {"a": {"seconds": 1.0, "peak_rss_mib": 2048, "rss_start_mib": 512, "rss_end_mib": 600}}
    header, rows = report.stage_table(_stages(tmp_path / "cpu", cpu))
    assert "GPU peak GiB" not in header and len(rows[0]) == len(header)
    assert report.peak_memory(_stages(tmp_path / "cpu", cpu)) == "2.00 GiB (a)"
    gpu = {**cpu, "b": {"seconds": 2.0, "peak_rss_mib": 1024, "rss_start_mib": 512, "rss_end_mib": 600,
                        "gpu_peak_mib": 10240.0}}
    header, rows = report.stage_table(_stages(tmp_path / "gpu", gpu))
    assert header[-1] == "GPU peak GiB" and [r[-1] for r in rows] == ["–", "10.00"]
    assert report.peak_memory(_stages(tmp_path / "gpu", gpu)) == "2.00 GiB (a); GPU 10.00 GiB (b)"


def test_a_manifest_with_stats_only_is_no_stage_row(tmp_path):
    """Stats-only manifests (hand-made, or written before timings were recorded) stay out of the
    stage table but still fill the data table; a half-written one leaves a gap, not an error."""
    run = make_run(tmp_path)
    write_file(run / "iter_02" / "select" / "manifest.json", "{half")
    md = report.write_report(run)["markdown"].read_text(encoding="utf-8")
    stages = md[md.index("## Stages"):md.index("## Plots")]
    assert "iter_01/curate" not in stages and "iter_01/finetune" in stages
    assert "| keep rate | – | – | 0.500 | – |" in md


def test_report_shows_judge_and_curator_calibration(tmp_path):
    from evals.alpaca import Judge
    from evals.calibration import judge_eval, pairs

    run = make_run(tmp_path)
    sample = pairs.load_pairs("packaged", ["llmbar_natural", "llmbar_mtbench"], n=6)
    result = judge_eval.evaluate_judge(Judge("humpback_longest_fake"), sample, cache_dir=None)
    result.pop("timing")
    write_file(run / "judge_check" / "calibration.json", result)
    summary = _eval(0.5, trusted=False)
    summary["judge_check"] = {"human_accuracy": 0.6, "human_accuracy_low": 0.4, "human_accuracy_high": 0.8,
                              "minus_longer": 0.0, "minus_longer_low": -0.1, "minus_longer_high": 0.1,
                              "trusted": False, "verdict": result["verdict"]}
    write_file(run / "iter_02" / "eval" / "summary.json", summary)
    manifest = run / "iter_02" / "curate" / "manifest.json"
    stats = json.loads(manifest.read_text())
    stats["stats"]["calibration"] = {"human_accuracy": 0.625, "human_accuracy_low": 0.475, "human_accuracy_high": 0.775,
                                     "suggested_k": 2.09}
    manifest.write_text(json.dumps(stats))
    report.write_report(run)
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "## Judge calibration (outside labels, 95% intervals)" in md and result["verdict"] in md
    assert "| human labels, all | humpback_longest_fake | 12 |" in md and "| human labels, all | longer | 12 |" in md
    assert "| judge/human_accuracy | – | – | – | 0.600 [0.400, 0.800] |" in md
    assert "| curator accuracy, human labels | – | – | – | 0.625 [0.475, 0.775] |" in md
    assert "| k suggested by labels | – | – | – | 2.090 |" in md
    assert f"judge calibration: {result['verdict']}" in md
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Judge calibration (outside labels" in html
