"""lm-eval stock tasks as held-out tasks: name checks, subsets, summaries, and whole runs.

The stock tasks download their data from the hub, which tests cannot reach, so the runs use a
TaskManager over toy task YAMLs made here (a group of two multiple-choice tasks over local JSONL
files, tagged), built by the same code path; name checks also run against lm-eval's real index.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="held-out evaluation needs lm-eval")

from evals import heldout, hub_tasks, lm_eval_runner  # noqa: E402
from evals.hub_tasks import HubTaskError  # noqa: E402
from pipeline.data import DataError  # noqa: E402

PAPER_TASKS = ["arc_easy", "arc_challenge", "piqa", "social_iqa", "openbookqa", "mmlu"]
SIZES = {"toy_a": 7, "toy_b": 5}


pytestmark = pytest.mark.usefixtures("no_network")


def toy_rows(name: str) -> list[dict]:
    return [{"question": f"Is {name} statement {i} about the weather true?", "choices": [f"yes {i}", f"no {i}"],
             "label": i % 2} for i in range(SIZES[name])]


def write_toy_tasks(folder: Path) -> Path:
    """Two tasks (tag ``toy_tag``) and a group ``toy`` over both, like lm-eval's stock YAMLs but
    reading JSONL files through datasets' packaged ``json`` builder (no loading script)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SIZES:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(name)))
        (folder / f"{name}.yaml").write_text(f"""task: {name}
tag: toy_tag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / 'datasets-cache'}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (folder / "toy.yaml").write_text("group: toy\ntask: [toy_a, toy_b]\naggregate_metric_list:\n"
                                     "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n")
    return folder


@pytest.fixture(scope="module")
def toy_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = write_toy_tasks(tmp_path_factory.mktemp("toy-tasks"))
    return TaskManager(include_path=str(folder), include_defaults=False)


# --------------------------------------------------------------------------- names


def test_paper_tasks_are_lm_eval_stock_names_and_siqa_is_suggested():
    """Against lm-eval's real task index (no network): the paper's tasks exist under these names."""
    assert hub_tasks.validate_task_names(PAPER_TASKS) == PAPER_TASKS
    with pytest.raises(HubTaskError) as err:
        hub_tasks.validate_task_names(["arc_easy", "siqa", "mmlu"])
    message = str(err.value)
    assert "'siqa' (did you mean social_iqa" in message and "arc_easy'" not in message
    assert isinstance(err.value, DataError)  # the CLI turns it into exit status 3


def test_unknown_names_list_close_matches():
    known = ["arc_easy", "arc_challenge", "hellaswag", "openbookqa", "social_iqa", "piqa"]
    with pytest.raises(HubTaskError) as err:
        hub_tasks.validate_task_names(["ARC_Easy", "hellaswg", "obqa", "zzzzzz", "piqa"], known)
    message = str(err.value)
    assert "'ARC_Easy' (did you mean arc_easy" in message
    assert "'hellaswg' (did you mean hellaswag" in message
    assert "'obqa' (did you mean openbookqa" in message
    assert "'zzzzzz' (no close match)" in message
    assert "'piqa'" not in message
    with pytest.raises(HubTaskError, match="no hub tasks"):
        hub_tasks.validate_task_names([], known)


def test_config_refuses_colliding_repeated_or_stray_hub_settings():
    from harness.config import ConfigError, load_config

    cfg = load_config(None, ["eval.heldout_hub_tasks=[arc_easy, mmlu]", "eval.heldout_hub_num_fewshot={mmlu: 5}"])
    assert cfg.eval.heldout_hub_tasks == ["arc_easy", "mmlu"] and cfg.eval.heldout_hub_num_fewshot == {"mmlu": 5}
    for overrides, message in [
        (["eval.heldout_hub_tasks=[gsm8k]"], "listed in both heldout_tasks"),
        (["eval.heldout_hub_tasks=[piqa, piqa]"], "more than once"),
        (["eval.heldout_hub_num_fewshot={mmlu: 5}"], "not in heldout_hub_tasks"),
        (["eval.heldout_hub_tasks=[mmlu]", "eval.heldout_hub_num_fewshot={mmlu: -1}"], ">= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


# --------------------------------------------------------------------------- subsets and plans


def test_hub_subsets_are_seeded_sorted_and_follow_the_data():
    a = hub_tasks.choose_hub_samples("allenai/ai2_arc:ARC-Easy:test", 2376, 10, seed=0)
    assert a == hub_tasks.choose_hub_samples("allenai/ai2_arc:ARC-Easy:test", 2376, 10, seed=0) == sorted(a)
    assert len(set(a)) == 10
    assert a != hub_tasks.choose_hub_samples("allenai/ai2_arc:ARC-Easy:test", 2376, 10, seed=1)
    assert a != hub_tasks.choose_hub_samples("allenai/ai2_arc:ARC-Challenge:test", 2376, 10, seed=0)
    assert hub_tasks.choose_hub_samples("x", 4, 10, seed=0) == [0, 1, 2, 3]


def test_prepare_group_subsets_each_task_and_records_its_data(toy_manager):
    plan = hub_tasks.prepare_hub_tasks(["toy"], limit=3, seed=0, num_fewshot={"toy": 0}, task_manager=toy_manager)
    assert plan.members == {"toy": ["toy_a", "toy_b"]} and plan.groups == {"toy"}
    assert plan.reported_tasks() == ["toy"]
    assert set(plan.samples) == {"toy_a", "toy_b"}
    for name, indices in plan.samples.items():
        assert len(indices) == 3 and indices == sorted(indices) and max(indices) < SIZES[name]
    again = hub_tasks.prepare_hub_tasks(["toy"], limit=3, seed=0, num_fewshot={"toy": 0}, task_manager=toy_manager)
    assert again.samples == plan.samples
    record = plan.tasks["toy"]["toy_a"]
    expected = hashlib.sha256(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in toy_rows("toy_a")))
    assert record["docs_sha256"] == expected.hexdigest()
    assert (record["n_docs"], record["split"], record["num_fewshot"], record["version"]) == (7, "test", 0, 1.0)
    assert hub_tasks.data_digest(plan, "toy") != hub_tasks.data_digest(plan, "toy_a") is not None
    # A tag reports each of its tasks; no limit means every document.
    tagged = hub_tasks.prepare_hub_tasks(["toy_tag"], limit=None, seed=0, task_manager=toy_manager)
    assert tagged.reported_tasks() == ["toy_a", "toy_b"] and tagged.samples is None


def test_prepare_refuses_before_loading_anything(toy_manager, monkeypatch):
    monkeypatch.setattr(toy_manager, "load", lambda *a, **k: pytest.fail("tasks loaded before names were checked"))
    with pytest.raises(HubTaskError, match=r"'toy_c' \(did you mean [^)]*toy_a"):
        hub_tasks.prepare_hub_tasks(["toy", "toy_c"], limit=2, seed=0, task_manager=toy_manager)
    with pytest.raises(HubTaskError, match="positive"):
        hub_tasks.prepare_hub_tasks(["toy"], limit=0, seed=0, task_manager=toy_manager)
    with pytest.raises(HubTaskError, match="few-shot"):
        hub_tasks.prepare_hub_tasks(["toy"], limit=2, seed=0, num_fewshot={"toy_a": 1}, task_manager=toy_manager)


def test_prepare_reports_overlaps_and_load_failures(toy_manager, monkeypatch):
    with pytest.raises(HubTaskError, match="both contain the lm-eval task 'toy_a'"):
        hub_tasks.prepare_hub_tasks(["toy", "toy_a"], limit=2, seed=0, task_manager=toy_manager)

    def offline(names):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(toy_manager, "load", offline)
    with pytest.raises(HubTaskError, match=r"'toy_a' could not be loaded.*ConnectionError.*allenai/ai2_arc"):
        hub_tasks.prepare_hub_tasks(["toy_a"], limit=2, seed=0, task_manager=toy_manager)


# --------------------------------------------------------------------------- summaries


def fake_results() -> dict:
    """The shape lm-eval 0.4.13's simple_evaluate returns for arc_easy, the mmlu group (two of its
    tasks shown) and one task of a tag."""
    return {
        "results": {
            "arc_easy": {"alias": "arc_easy", "name": "arc_easy", "sample_len": 20, "acc,none": 0.55,
                         "acc_stderr,none": 0.114, "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"},
            "mmlu": {"alias": "mmlu", "name": "mmlu", "sample_len": 40, "acc,none": 0.3, "acc_stderr,none": 0.07},
            "mmlu_anatomy": {"alias": " - anatomy", "sample_len": 20, "acc,none": 0.25, "acc_stderr,none": 0.1},
            "mmlu_astronomy": {"alias": " - astronomy", "sample_len": 20, "acc,none": 0.35, "acc_stderr,none": 0.1},
            "lambada_openai": {"alias": "lambada_openai", "sample_len": 20, "perplexity,none": 12.5,
                               "perplexity_stderr,none": 1.5, "acc,none": float("nan")},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"]},
        "versions": {"arc_easy": 1.0, "mmlu": 2, "mmlu_anatomy": 1.0, "mmlu_astronomy": 1.0, "lambada_openai": 1.0},
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "mmlu": {"acc": True},
                             "lambada_openai": {"perplexity": False, "acc": True}},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 20},
                      "mmlu_anatomy": {"original": 135, "effective": 20},
                      "mmlu_astronomy": {"original": 152, "effective": 20},
                      "lambada_openai": {"original": 5153, "effective": 20}},
    }


def test_summary_has_the_local_tasks_shape():
    out = hub_tasks.summarize_hub_metrics(fake_results(), ["arc_easy", "mmlu", "lambada"],
                                          members={"lambada": ["lambada_openai"]})
    assert list(out) == ["arc_easy/acc", "arc_easy/acc_norm", "lambada_openai/perplexity", "mmlu/acc"]
    assert out["arc_easy/acc"] == {"value": 0.55, "stderr": 0.114, "n": 20, "task": "arc_easy", "task_version": 1.0,
                                   "higher_is_better": True, "source": "lm_eval_hub"}
    assert out["arc_easy/acc_norm"]["stderr"] is None  # lm-eval's "N/A"
    assert out["mmlu/acc"]["n"] == 40 and out["mmlu/acc"]["task_version"] == 2  # the group's tasks summed
    assert out["lambada_openai/perplexity"]["higher_is_better"] is False  # NaN acc left out
    # Same keys as the local tasks' summaries (plus the source).
    local_keys = {"value", "stderr", "n", "task", "task_version", "higher_is_better"}
    assert all(set(m) == local_keys | {"source"} for m in out.values())
    with pytest.raises(HubTaskError, match="no results for 'piqa'"):
        hub_tasks.summarize_hub_metrics(fake_results(), ["piqa"])


# --------------------------------------------------------------------------- whole runs


def test_hub_run_matches_the_local_tasks_setup(tiny_model, toy_manager, tmp_path):
    plan = hub_tasks.prepare_hub_tasks(["toy"], limit=3, seed=0, task_manager=toy_manager)
    summary = hub_tasks.run_hub_tasks(str(tiny_model), tmp_path / "hub", plan, batch_size=4,
                                      system_prompt="Answer briefly.")
    assert set(summary["metrics"]) == {"toy/acc"}
    m = summary["metrics"]["toy/acc"]
    assert m["n"] == 6 and 0 <= m["value"] <= 1 and m["source"] == "lm_eval_hub" and str(m["task_version"]) == "2"
    cfg = summary["config"]
    assert cfg["model"]["dtype"] == lm_eval_runner.DTYPE and cfg["apply_chat_template"] and cfg["fewshot_as_multiturn"]
    assert cfg["tasks"]["toy"]["toy_b"]["n_docs"] == 5 and cfg["limit"] == 3
    results = json.loads((tmp_path / "hub" / "results.json").read_text())
    assert results["humpback"]["sample_indices"] == plan.samples
    for name in ("toy_a", "toy_b"):
        rows = [json.loads(x) for x in (tmp_path / "hub" / f"samples_{name}.jsonl").read_text().splitlines()]
        assert sorted(r["doc_id"] for r in rows) == plan.samples[name]
        prompt = rows[0]["arguments"][0][0]
        assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>") and "<|im_start|>assistant" in prompt
    assert json.loads((tmp_path / "hub" / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_harness_runs_local_and_hub_tasks_on_one_loaded_model(tiny_model, toy_manager, eval_data, tmp_path,
                                                              monkeypatch):
    import lm_eval.tasks

    from harness import evaluate
    from harness.config import load_config

    real_manager = lm_eval.tasks.TaskManager
    # lm-eval's default index (what hub tasks use) is the toy one; the local tasks' own index is real.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: real_manager(*a, **k) if a or k else toy_manager)
    built = []
    real_build = lm_eval_runner.build_lm
    monkeypatch.setattr(lm_eval_runner, "build_lm", lambda *a, **k: built.append(k["batch_size"]) or real_build(*a, **k))
    from pipeline import memory

    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    cfg = load_config(None, [f"eval.data_dir={eval_data}", "eval.heldout_tasks=[truthfulqa_mc1]",
                             "eval.heldout_hub_tasks=[toy]", "eval.heldout_limit=2", "eval.batch_size=4",
                             "eval.heldout_batch_size=2", "engine.device=cpu"])
    settings = evaluate.eval_settings(cfg)
    metrics = evaluate._heldout_metrics(cfg, str(tiny_model), tmp_path, settings)
    assert built == [2]  # one model load for both, at the held-out batch size
    assert trims  # freed heap pages are handed back between lm-eval's batches
    assert set(metrics) == {"truthfulqa_mc1/acc", "toy/acc"}
    local, hub = metrics["truthfulqa_mc1/acc"], metrics["toy/acc"]
    assert set(local["provenance"]) == {"eval_config", "task_version"}  # as before hub tasks existed
    assert hub["provenance"]["source"] == "lm_eval_hub" and str(hub["provenance"]["task_version"]) == "2"
    assert hub["provenance"]["data"] and hub["provenance"]["eval_config"] == local["provenance"]["eval_config"]
    assert hub["n"] == 4 and local["n"] == 2 and hub["higher_is_better"] is True
    assert (tmp_path / "heldout" / "results.json").is_file() and (tmp_path / "heldout_hub" / "results.json").is_file()
    assert math.isfinite(hub["value"])


def test_harness_refuses_hub_metrics_that_would_shadow_local_ones(tiny_model, tmp_path, monkeypatch):
    """Like lm-eval's stock tag ``truthfulqa``, which holds ``truthfulqa_mc1``: a tag whose task has a
    local task's name would report under the same metric names; refused before the model loads."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from harness import evaluate
    from harness.config import load_config

    folder = write_toy_tasks(tmp_path / "tasks")
    text = (folder / "toy_a.yaml").read_text()
    text = text.replace("task: toy_a", "task: gsm8k").replace("tag: toy_tag", "tag: toy_math")
    (folder / "toy_a.yaml").write_text(text)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: manager)
    monkeypatch.setattr(lm_eval_runner, "build_lm", lambda *a, **k: pytest.fail("model loaded before the clash was found"))
    cfg = load_config(None, ["eval.heldout_tasks=[gsm8k]", "eval.heldout_hub_tasks=[toy_math]", "engine.device=cpu"])
    with pytest.raises(HubTaskError, match=r"under \['gsm8k'\]"):
        evaluate._heldout_metrics(cfg, str(tiny_model), tmp_path / "out", {})
