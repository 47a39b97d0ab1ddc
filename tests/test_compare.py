"""humpback compare on hand-made run directories: paired differences, refusals with reasons, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_file
from evals.item_scores import item_scores
from evals.paired import corrected_level, paired_difference
from harness.compare import CompareError, compare_runs
from harness.compare_report import as_json, render_markdown, render_text

WIN = "alpaca_eval/win_rate"
IFEVAL = "ifeval/prompt_level_loose_acc"
PROMPTS = [f"instruction {i}" for i in range(6)]
GATED = [{"metric": IFEVAL, "abs_tol": 0.1}]


def _summary(win: float, acc: float, *, n_docs: int, eval_config: str, trusted: bool) -> dict:
    return {"model": "m", "seconds": 1.0, "judge_check": {"trusted": trusted}, "metrics": {
        WIN: {"value": win, "stderr": 12.0, "n": len(PROMPTS), "higher_is_better": True, "trusted": trusted,
              "provenance": {"eval_config": eval_config, "judge": "rubric@base", "reference": "text_davinci_003"}},
        IFEVAL: {"value": acc, "stderr": 0.2, "n": n_docs, "higher_is_better": True, "trusted": True,
                 "provenance": {"eval_config": eval_config, "task_version": 4}},
    }}


def write_model(run: Path, model: str, prefs: list[float], docs: list[bool], *, eval_config: str = "cfg1",
                trusted: bool = False, hashes: list[str] | None = None) -> None:
    """An evaluated model: summary.json, the judge's per-prompt preferences (1 = reference won, 2 =
    this model won) and lm-eval's per-document samples."""
    ev = run / model / "eval"
    win = sum((p - 1) * 100 for p in prefs) / len(prefs)
    write_file(ev / "summary.json", _summary(win, sum(docs) / len(docs), n_docs=len(docs),
                                             eval_config=eval_config, trusted=trusted))
    write_file(ev / "alpaca" / "annotations.json",  # a JSON array, as alpaca_eval writes it
               json.dumps([{"instruction": i, "preference": p} for i, p in zip(PROMPTS, prefs)]))
    hashes = hashes or [f"h{i}" for i in range(len(docs))]
    write_file(ev / "heldout" / "samples_ifeval.jsonl", [
        {"doc_id": i, "doc_hash": hashes[i], "filter": "none", "metrics": ["prompt_level_loose_acc"],
         "prompt_level_loose_acc": ok} for i, ok in enumerate(docs)])


def write_run(root: Path, name: str, iterations: int, models: dict[str, tuple[list[float], list[bool]]],
              **kwargs) -> Path:
    run = root / name
    config = {"run": {"name": name, "tags": {"ablation": name}}, "iterate": {"iterations": iterations},
              "gate": {"metrics": GATED}, "tracking": {"experiment": "humpback/ablations"}}
    write_file(run / "config.yaml", yaml.safe_dump(config))
    for model, (prefs, docs) in models.items():
        write_model(run, model, prefs, docs, **kwargs)
    return run


BASE_PREFS = [1.0, 1.0, 1.5, 2.0, 1.0, 1.0]
BASE_DOCS = [True, False, False, True, False, False, True, False]


@pytest.fixture
def ablations(tmp_path) -> list[Path]:
    seed_only = write_run(tmp_path, "seed-only", 0, {"iter_00": (BASE_PREFS, BASE_DOCS)})
    curated = write_run(tmp_path, "curated", 2, {
        "iter_00": (BASE_PREFS, BASE_DOCS),
        "iter_01": ([1.0, 2.0, 1.5, 2.0, 1.0, 1.0], BASE_DOCS),
        "iter_02": ([2.0, 2.0, 1.5, 2.0, 1.0, 2.0], [True, True, False, True, True, False, True, False])})
    return [curated, seed_only]


def test_differences_are_the_paired_differences_of_the_items(ablations):
    curated, seed_only = ablations
    comparison = compare_runs([curated, seed_only])
    assert comparison.baseline.label == "seed-only/iter_00"  # the run without iterations, not the first given
    assert [e.label for e in comparison.entries] == ["seed-only/iter_00", "curated/iter_02"]
    assert comparison.metrics == [IFEVAL, WIN]  # the gated metric, then the headline
    level = corrected_level(0.95, 2)
    assert comparison.corrected == pytest.approx(level)
    final = comparison.entries[1]
    for metric in (IFEVAL, WIN):
        mine, theirs = item_scores(curated / "iter_02" / "eval", metric), item_scores(seed_only / "iter_00" / "eval", metric)
        expected = paired_difference(mine.values, theirs.values, level=level, power=0.8, bounds=mine.bounds)
        cell = comparison.cell(final, metric)
        assert cell.paired == expected and cell.signal == "paired items" and cell.why_not is None
    assert comparison.cell(final, IFEVAL).paired.estimate == pytest.approx(2 / 8)
    assert comparison.cell(final, WIN).paired.estimate == pytest.approx(50.0)
    assert comparison.cell(comparison.baseline, WIN).signal == "baseline"


def test_untrusted_numbers_carry_the_dagger(ablations):
    comparison = compare_runs(ablations)
    final = comparison.entries[1]
    assert comparison.cell(final, WIN).trusted is False and comparison.cell(final, IFEVAL).trusted is True
    text = render_text(comparison)
    assert "+50 [" in text and "] †" in text and "† untrusted" in text


def test_mismatched_provenance_is_refused_with_a_reason(tmp_path, ablations):
    curated, seed_only = ablations
    other = write_run(tmp_path, "other-eval", 1, {"iter_01": (BASE_PREFS, BASE_DOCS)}, eval_config="cfg2")
    fewer = write_run(tmp_path, "fewer-docs", 1, {"iter_01": (BASE_PREFS, BASE_DOCS[:4])})
    comparison = compare_runs([seed_only, curated, other, fewer])
    by = {e.run: e for e in comparison.entries}
    cell = comparison.cell(by["other-eval"], IFEVAL)
    assert cell.paired is None and "evaluation settings differ" in cell.why_not and "cfg2" in cell.why_not
    assert "different numbers of items (4 vs 8" in comparison.cell(by["fewer-docs"], IFEVAL).why_not
    assert comparison.cell(by["fewer-docs"], WIN).paired is not None  # only the held-out task was cut
    reasons = as_json(comparison)["rows"][2]["cells"][IFEVAL]
    assert reasons["difference"] is None and reasons["why_not"] == cell.why_not
    text = render_text(comparison)
    assert "n/c[1]" in text and "n/c[1] not compared: evaluation settings differ" in text


def test_items_with_other_content_are_refused(tmp_path, ablations):
    _, seed_only = ablations
    changed = write_run(tmp_path, "changed", 1, {"iter_01": (BASE_PREFS, BASE_DOCS)},
                        hashes=["h0", "other", *[f"h{i}" for i in range(2, 8)]])
    comparison = compare_runs([seed_only, changed])
    assert comparison.cell(comparison.entries[1], IFEVAL).why_not == "1 of the items differ in content (doc_hash)"


def test_only_the_system_prompt_differs_is_compared_on_request(tmp_path, ablations, monkeypatch):
    from harness import compare

    _, seed_only = ablations
    no_tags = write_run(tmp_path, "no-tags", 2, {"iter_02": (BASE_PREFS, BASE_DOCS)}, eval_config="cfg-notags")
    settings = {seed_only.name: {"alpaca_subset": 6, "system": "Answer in the style of an AI Assistant."},
                no_tags.name: {"alpaca_subset": 6, "system": None}}
    monkeypatch.setattr(compare, "_recomputed_eval_settings", lambda entry, digest: settings[entry.run_dir.name])
    strict = compare_runs([seed_only, no_tags])
    why = strict.cell(strict.entries[1], IFEVAL).why_not
    assert "system prompt differs" in why and "--system-prompt-as-model" in why
    lenient = compare_runs([seed_only, no_tags], system_prompt_as_model=True)
    cell = lenient.cell(lenient.entries[1], IFEVAL)
    assert cell.paired is not None and cell.paired.estimate == 0 and "system prompts differ" in cell.note
    assert "‡" in render_text(lenient)
    settings[no_tags.name] = {"alpaca_subset": 8, "system": None}  # and something else too
    mixed = compare_runs([seed_only, no_tags], system_prompt_as_model=True)
    assert "alpaca_subset: 8 vs 6" in mixed.cell(mixed.entries[1], IFEVAL).why_not


def test_baseline_metrics_and_rows_can_be_chosen(ablations):
    curated, seed_only = ablations
    comparison = compare_runs([curated, seed_only], baseline="curated/iter_01", metrics=[WIN], all_models=True)
    labels = [e.label for e in comparison.entries]
    assert labels[0] == "curated/iter_01" and "curated/iter_00" in labels and "seed-only/iter_00" in labels
    assert comparison.metrics == [WIN]
    assert comparison.comparisons == len(labels) - 1
    with pytest.raises(CompareError, match="no evaluated model 'iter_05'"):
        compare_runs([curated], baseline="curated/iter_05")
    with pytest.raises(CompareError, match="not evaluated in any"):
        compare_runs([curated], metrics=["gsm8k/exact_match"])
    assert set(compare_runs([curated], metrics=["all"]).metrics) == {WIN, IFEVAL}


def test_a_run_without_evaluation_is_skipped_and_named(tmp_path, ablations):
    empty = tmp_path / "empty"
    write_file(empty / "config.yaml", "run:\n  name: empty\n")
    comparison = compare_runs([*ablations, empty])
    assert any("no evaluated model" in s for s in comparison.skipped)
    assert "skipped:" in render_markdown(comparison)
    with pytest.raises(CompareError):
        compare_runs([empty])


def test_cli_prints_and_writes_the_table(ablations, tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "cmp"
    code = main(["compare", *map(str, ablations), "--out", str(out), "--no-mlflow"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "run/model" in printed and "seed-only/iter_00" in printed and "curated/iter_02" in printed
    assert "baseline" in printed and "Smallest detectable difference" in printed
    md = (out / "compare.md").read_text()
    assert "| curated/iter_02 |" in md and "ablation=curated" in md
    data = json.loads((out / "compare.json").read_text())
    assert data["baseline"] == "seed-only/iter_00" and data["rows"][1]["cells"][IFEVAL]["difference"]["n"] == 8
    assert main(["compare", str(tmp_path / "nowhere"), "--no-mlflow"]) == 2
    assert main(["compare", *map(str, ablations), "--baseline", "x", "--no-mlflow"]) == 2


def test_cli_logs_the_runs_side_by_side_in_one_experiment(ablations, tmp_path, capsys):
    pytest.importorskip("mlflow")
    from harness.cli import main
    from harness.mlflow_client import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["compare", *map(str, ablations), "--out", str(tmp_path / "cmp"), "--tracking-uri", uri]) == 0
    assert "2 parent runs in experiment humpback/ablations" in capsys.readouterr().out
    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name("humpback/ablations")
    parents = [r for r in mlflow.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["ablation"] for r in parents) == ["curated", "seed-only"]
    assert all(IFEVAL in r.data.metrics for r in parents)  # the same metric names on every parent
