"""Held-out evaluation through lm-eval: task definitions, subsets, IFEval scoring offline, and
whole runs of all four tasks on the tiny model (2 documents each, a few generated tokens)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval", reason="held-out evaluation needs lm-eval[ifeval]")

from evals import heldout  # noqa: E402
from evals.heldout import HeldoutError, choose_samples, run_heldout  # noqa: E402
from evals.tasks import utils as task_utils  # noqa: E402

TASKS = ("ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")
EXPECTED_METRICS = {
    "ifeval/prompt_level_strict_acc",
    "ifeval/inst_level_strict_acc",
    "ifeval/prompt_level_loose_acc",
    "ifeval/inst_level_loose_acc",
    "truthfulqa_mc1/acc",
    "truthfulqa_mc2/acc",
    "gsm8k/exact_match_strict",
    "gsm8k/exact_match_flexible",
}
LIMIT = 2


class _TagsAsText(yaml.SafeLoader):
    """Reads task YAMLs without importing what their ``!function`` tags name."""


_TagsAsText.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_yaml(path: Path) -> dict:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagsAsText)  # noqa: S506 (SafeLoader subclass)
    if "include" in cfg:
        base = read_task_yaml(path.parent / cfg.pop("include"))
        cfg = base | cfg
    return cfg


def lm_eval_task_yaml(relative: str) -> dict:
    import lm_eval

    return read_task_yaml(Path(lm_eval.__file__).parent / "tasks" / relative)


@pytest.fixture(scope="module")
def base_run(tiny_model, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout-base")
    summary = run_heldout(
        str(tiny_model), out, data_dir=eval_data, tasks=TASKS, limit=LIMIT, batch_size=4,
        max_gen_toks=4, system_prompt="Answer briefly.",
    )
    return out, summary


# --- task definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("ifeval", "ifeval/ifeval.yaml"),
        ("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml"),
        ("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml"),
        ("gsm8k", "gsm8k/gsm8k.yaml"),
    ],
)
def test_templates_mirror_lm_eval_builtins(tmp_path, ours, theirs):
    """Prompt, choices, target, metrics, filters, stop strings and version are lm-eval's."""
    files = {t: {k: tmp_path / f"{t}-{k}.data" for k in spec.files} for t, spec in heldout.HELDOUT_TASKS.items()}
    heldout.write_task_yamls([ours], files, tmp_path / "tasks", max_gen_toks=256)
    mine = read_task_yaml(tmp_path / "tasks" / heldout.HELDOUT_TASKS[ours].template)
    builtin = lm_eval_task_yaml(theirs)

    assert mine["task"] == "humpback_" + ours
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "num_fewshot", "fewshot_split",
                "filter_list", "metadata"):
        assert mine.get(key) == builtin.get(key), key
    assert [(m["metric"], m["higher_is_better"]) for m in mine["metric_list"]] == [
        (m["metric"], m["higher_is_better"]) for m in builtin["metric_list"]
    ]
    if "generation_kwargs" in builtin:
        assert mine["generation_kwargs"]["until"] == builtin["generation_kwargs"]["until"]
        assert mine["generation_kwargs"]["max_gen_toks"] == 256
    # The rendered files name their data by absolute path and have no placeholder left.
    for rendered in (tmp_path / "tasks").glob("*.yaml"):
        assert not re.search(r"@[A-Z_]+@", rendered.read_text())
    named = set(mine["dataset_kwargs"].values())
    assert named and named <= {str(p) for f in files.values() for p in f.values()}


def test_mc2_template_brings_its_include(tmp_path):
    files = {t: {k: tmp_path / k for k in spec.files} for t, spec in heldout.HELDOUT_TASKS.items()}
    out = heldout.write_task_yamls(["truthfulqa_mc2"], files, tmp_path / "tasks", max_gen_toks=8)
    assert sorted(p.name for p in out.glob("*.yaml")) == ["humpback_truthfulqa_mc1.yaml", "humpback_truthfulqa_mc2.yaml"]
    heldout.write_task_yamls(["gsm8k"], files, out, max_gen_toks=8)  # stale YAMLs are removed
    assert [p.name for p in out.glob("*.yaml")] == ["humpback_gsm8k.yaml"]


def test_truthfulqa_records_take_the_hub_shape(eval_data):
    rows = task_utils.read_records(eval_data / "heldout/truthfulqa/v1/mc_task.json.gz")
    assert len(rows) == 817
    rec = task_utils.truthfulqa_record(rows[0])
    assert rec["mc1_targets"]["labels"][0] == 1 and sum(rec["mc1_targets"]["labels"]) == 1
    assert rec["mc1_targets"]["choices"] == list(rows[0]["mc1_targets"])
    assert len(rec["mc2_targets"]["choices"]) == len(rec["mc2_targets"]["labels"])


def test_subsets_are_seeded_sorted_and_shared_by_mc1_mc2():
    a = choose_samples("gsm8k", 1319, 5, seed=0)
    assert a == choose_samples("gsm8k", 1319, 5, seed=0) == sorted(a)
    assert len(set(a)) == 5 and a != choose_samples("gsm8k", 1319, 5, seed=1)
    assert choose_samples("truthfulqa_mc1", 817, 4, 3) == choose_samples("truthfulqa_mc2", 817, 4, 3)
    assert choose_samples("ifeval", 3, 10, 0) == [0, 1, 2]


# --- IFEval scoring offline -----------------------------------------------------------------------


def test_ifeval_metric_runs_offline_on_packaged_nltk_data(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    folder = task_utils.configure_nltk()
    assert (folder / "tokenizers/punkt_tab/english").is_dir()
    # Arrow fills absent kwargs with None, as in the hub's IFEval; the scorer must ignore them.
    empty = {"num_sentences": None, "relation": None, "keywords": None}
    doc = {
        "key": 1,
        "prompt": "Describe the sea in fewer than 3 sentences. Do not use any commas.",
        "instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
        "kwargs": [empty | {"relation": "less than", "num_sentences": 3}, dict(empty)],
    }
    good = task_utils.ifeval_process_results(doc, ["The sea is vast. Dr. Jones sails on it daily."])
    assert good == {
        "prompt_level_strict_acc": True,
        "inst_level_strict_acc": [True, True],
        "prompt_level_loose_acc": True,
        "inst_level_loose_acc": [True, True],
    }
    # Three sentences (punkt must split them, and keep "Dr." whole above) and a comma: fails both.
    bad = task_utils.ifeval_process_results(doc, ["The sea is vast. It is blue, and deep. I like it."])
    assert bad["inst_level_strict_acc"] == [False, False] and not bad["prompt_level_loose_acc"]
    assert task_utils.ifeval_agg_inst_level_acc([[True, True], [False, False]]) == 0.5


# --- whole runs -------------------------------------------------------------------------------------


def test_run_reports_every_metric_with_provenance(base_run):
    out, summary = base_run
    assert set(summary["metrics"]) == EXPECTED_METRICS
    versions = {"ifeval": 4.0, "truthfulqa_mc1": 2.0, "truthfulqa_mc2": 3.0, "gsm8k": 3.0}
    for name, m in summary["metrics"].items():
        task = name.split("/")[0]
        assert m["task"] == "humpback_" + task
        assert m["task_version"] == versions[task]
        assert m["n"] == LIMIT
        assert 0.0 <= m["value"] <= 1.0 + 1e-9
        assert m["stderr"] is None or m["stderr"] >= 0
        assert m["higher_is_better"] is True
    assert re.fullmatch(r"[0-9a-f]{16}", summary["config_digest"])
    cfg = summary["config"]
    assert cfg["limit"] == LIMIT and cfg["system_prompt"] == "Answer briefly." and cfg["apply_chat_template"]
    assert cfg["model"]["adapter"] is False and cfg["packages"]["lm_eval"]
    assert cfg["tasks"]["gsm8k"]["n_docs"] == 1319 and set(cfg["tasks"]["gsm8k"]["data"]) == {
        "heldout/gsm8k/test.jsonl", "heldout/gsm8k/train.jsonl"
    }
    assert summary["seconds"] > 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_run_writes_raw_outputs(base_run):
    out, summary = base_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"humpback_" + t for t in TASKS}
    indices = results["humpback"]["sample_indices"]
    for task in TASKS:
        rows = [json.loads(x) for x in (out / f"samples_{task}.jsonl").read_text().splitlines()]
        filters = 2 if task == "gsm8k" else 1  # lm-eval logs each document once per filter
        assert len(rows) == LIMIT * filters
        assert sorted({r["doc_id"] for r in rows}) == indices["humpback_" + task]
        prompt = rows[0]["arguments"][0][0]
        # Chat template and system prompt applied.
        assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>") and "<|im_start|>assistant" in prompt
        if task == "gsm8k":
            assert prompt.count("Question:") == 6  # five shots from train.jsonl, then the question
            assert rows[0]["arguments"][0][1]["max_gen_toks"] == 4
    assert {p.name for p in (out / "tasks").glob("*.yaml")} == {f"humpback_{t}.yaml" for t in TASKS}


def test_lora_adapter_directory(base_run, tiny_model, eval_data, tmp_path):
    """An adapter directory is evaluated on its base; its (non-zero) LoRA weights change scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), use_safetensors=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(adapter_dir, safe_serialization=True)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)

    out = tmp_path / "eval"
    summary = run_heldout(
        str(adapter_dir), out, data_dir=eval_data, tasks=["truthfulqa_mc1"], limit=LIMIT,
        system_prompt="Answer briefly.",
    )
    assert set(summary["metrics"]) == {"truthfulqa_mc1/acc"}
    assert summary["config"]["model"]["adapter"] is True
    assert summary["paths"]["adapter"] == str(adapter_dir.resolve())
    assert summary["paths"]["base"] == str(Path(tiny_model).resolve())

    def loglikelihoods(folder: Path) -> dict[int, list]:
        rows = [json.loads(x) for x in (folder / "samples_truthfulqa_mc1.jsonl").read_text().splitlines()]
        return {r["doc_id"]: r["filtered_resps"] for r in rows}

    with_adapter, without = loglikelihoods(out), loglikelihoods(base_run[0])
    assert with_adapter.keys() == without.keys()  # same seeded questions
    assert with_adapter != without


def test_bad_inputs_are_refused_before_loading(tiny_model, eval_data, tmp_path):
    with pytest.raises(HeldoutError, match="unknown"):
        run_heldout(str(tiny_model), tmp_path, data_dir=eval_data, tasks=["mmlu"])
    with pytest.raises(HeldoutError, match="missing"):
        run_heldout(str(tiny_model), tmp_path, data_dir=tmp_path, tasks=["gsm8k"])
    with pytest.raises(HeldoutError, match="safetensors"):
        run_heldout(str(tmp_path), tmp_path / "out", data_dir=eval_data, tasks=["gsm8k"])
    with pytest.raises(HeldoutError, match="unknown generation 'vllm'"):
        run_heldout(str(tiny_model), tmp_path, data_dir=eval_data, tasks=["gsm8k"], generation="vllm")
    with pytest.raises(HeldoutError, match="unknown dtype 'float16'"):
        run_heldout(str(tiny_model), tmp_path, data_dir=eval_data, tasks=["gsm8k"], dtype="float16")


def test_bf16_evaluation_loads_bf16_weights_and_records_it(base_run, tiny_model, eval_data, tmp_path):
    import torch

    from evals.lm_eval_runner import SharedLM, resolve_model

    spec = resolve_model(str(tiny_model))
    shared = SharedLM(spec, batch_size=4, device="cpu", dtype="bfloat16")
    summary = run_heldout(str(tiny_model), tmp_path, data_dir=eval_data, tasks=["truthfulqa_mc1"], limit=LIMIT,
                          batch_size=4, system_prompt="Answer briefly.", shared_lm=shared, dtype="bfloat16")
    assert {p.dtype for p in shared.get(spec, 4, "cpu", "engine", "bfloat16").model.parameters()} == {torch.bfloat16}
    assert summary["config"]["model"]["dtype"] == "bfloat16"
    assert base_run[1]["config"]["model"]["dtype"] == "float32"
    with pytest.raises(HeldoutError, match="bfloat16"):  # a model loaded in one dtype is not reused for another
        shared.get(spec, 4, "cpu", "engine", "float32")
