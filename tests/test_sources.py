"""AlpacaEval from the Hugging Face hub, the contamination check's view of it, and the checks made
before a run starts. ``hf_hub_download`` is replaced by a fake that serves small JSON files made
here (or a copy of the shared data) and records every call; no network is touched."""

from __future__ import annotations

import hashlib
import gzip
import json
import random
from pathlib import Path

import huggingface_hub
import pytest

from evals import sources
from harness import evaluate, stages
from harness.config import load_config
from harness.rundir import RunDir
from pipeline.data import DataError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
N_RECORDS = 12


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(autouse=True)
def _fresh_contamination_cache():
    stages._contamination.cache_clear()
    yield
    stages._contamination.cache_clear()


def alpaca_records(generator: str, n: int = N_RECORDS) -> list[dict]:
    return [{"instruction": f"Hub instruction number {i}: explain the tides of the northern sea in plain words",
             "output": f"{generator} answer {i}", "generator": generator, "dataset": "helpful_base"} for i in range(n)]


class FakeHub:
    """Serves ``<root>/snapshots/<COMMIT>/<filename>`` like the hub cache, or fails like offline."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[dict] = []
        self.offline = False

    def put(self, filename: str, records: list[dict] | None = None, source: Path | None = None) -> Path:
        path = self.root / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / COMMIT / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:  # the hub serves plain JSON; the packaged copy is gzipped
            raw = source.read_bytes()
            path.write_bytes(gzip.decompress(raw) if source.name.endswith(".gz") else raw)
        else:
            path.write_text(json.dumps(records, indent=1))
        return path

    def __call__(self, repo_id, filename, *, repo_type=None, revision=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type, "revision": revision})
        if self.offline:
            raise huggingface_hub.errors.LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache and outgoing traffic has been disabled")
        path = self.root / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / COMMIT / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


@pytest.fixture
def no_loading_scripts(monkeypatch):
    """datasets' loaders (and thereby any loading script) must not be used for AlpacaEval."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets.load_dataset called"))


# --------------------------------------------------------------------------- AlpacaEval from the hub


def test_hub_reference_subset_and_provenance(tmp_path, hub, no_loading_scripts):
    from evals import alpaca

    served = hub.put("alpaca_eval.json", alpaca_records("text_davinci_003"))
    nowhere = tmp_path / "nowhere"
    got = alpaca.load_instruction_set(nowhere, "text_davinci_003", subset_size=5, seed=3, source="auto")

    assert hub.calls == [{"repo_id": "tatsu-lab/alpaca_eval", "filename": "alpaca_eval.json",
                          "repo_type": "dataset", "revision": None}]
    expected = sorted(random.Random(3).sample(range(N_RECORDS), 5))
    assert got.indices == expected
    assert [r["instruction"] for r in got.instructions] == [alpaca_records("x")[i]["instruction"] for i in expected]
    assert [r["output"] for r in got.reference] == [f"text_davinci_003 answer {i}" for i in expected]
    prov = got.provenance()
    assert prov["reference"] == "text_davinci_003" and prov["reference_source"] == "hub"
    assert prov["reference_hub"] == {"repo_id": "tatsu-lab/alpaca_eval", "filename": "alpaca_eval.json",
                                     "revision": "main", "commit": COMMIT}
    assert prov["reference_sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()


def test_gpt4_turbo_reference_and_revision_come_from_the_baseline_file(tmp_path, hub):
    from evals import alpaca

    hub.put("alpaca_eval_gpt4_baseline.json", alpaca_records("gpt4_turbo"))
    got = alpaca.load_instruction_set(None, "gpt4_turbo", subset_size=4, seed=0, source="hub", hub_revision="v1.0")
    assert hub.calls[0]["filename"] == "alpaca_eval_gpt4_baseline.json" and hub.calls[0]["revision"] == "v1.0"
    assert {r["generator"] for r in got.reference} == {"gpt4_turbo"}
    assert got.provenance()["reference_hub"]["revision"] == "v1.0"


def test_hub_and_local_files_give_the_same_subset(tmp_path, hub, eval_data):
    """The real local reference served as the hub file: the same seeded instructions either way."""
    from evals import alpaca

    hub.put("alpaca_eval.json", source=eval_data / "alpaca_eval" / "reference_text_davinci_003.json.gz")
    local = alpaca.load_instruction_set(eval_data, "text_davinci_003", subset_size=16, seed=7, source="local")
    remote = alpaca.load_instruction_set(tmp_path / "nowhere", "text_davinci_003", subset_size=16, seed=7,
                                         source="auto")
    assert remote.indices == local.indices and len(local.indices) == 16
    assert remote.instructions == local.instructions and remote.reference == local.reference
    assert local.provenance()["reference_sha256"] == remote.provenance()["reference_sha256"]
    assert (local.provenance()["reference_source"], remote.provenance()["reference_source"]) == ("local", "hub")
    assert local.provenance()["reference_hub"] is None


def test_auto_prefers_the_local_file(hub, eval_data):
    from evals import alpaca

    got = alpaca.load_instruction_set(eval_data, "text_davinci_003", subset_size=3, seed=0, source="auto")
    assert hub.calls == [] and got.provenance()["reference_source"] == "local"
    assert sources.planned_kind(eval_data, "text_davinci_003", "auto") == "local"
    assert sources.planned_kind(eval_data, "text_davinci_003", "hub") == "hub"


def test_offline_without_local_file_names_both_failures(tmp_path, hub):
    hub.offline = True
    nowhere = tmp_path / "nowhere"
    with pytest.raises(sources.SourceError) as err:
        sources.resolve_reference(nowhere, "text_davinci_003", "auto")
    message = str(err.value)
    assert str(nowhere / "reference_text_davinci_003.json") in message  # the local path tried
    assert "alpaca_eval.json" in message and "tatsu-lab/alpaca_eval" in message  # the hub file tried
    assert "LocalEntryNotFoundError" in message and "disk cache" in message  # and why it failed
    assert isinstance(err.value, DataError)


def test_source_errors(tmp_path, hub):
    with pytest.raises(sources.SourceError, match="alpaca_eval.json.*EntryNotFoundError"):
        sources.resolve_reference(None, "text_davinci_003", "hub")  # nothing served
    with pytest.raises(sources.SourceError, match="eval.alpaca_source=local"):
        sources.resolve_reference(tmp_path, "text_davinci_003", "local")
    other = tmp_path / "other_model.json"
    other.write_text(json.dumps(alpaca_records("other")))
    with pytest.raises(sources.SourceError, match="read locally"):
        sources.resolve_reference(tmp_path, str(other), "hub")
    assert sources.resolve_reference(tmp_path, str(other), "auto").kind == "local"
    with pytest.raises(ValueError, match="unknown AlpacaEval source"):
        sources.resolve_reference(tmp_path, "text_davinci_003", "web")
    assert hub.calls and all(c["repo_type"] == "dataset" for c in hub.calls)


# --------------------------------------------------------------------------- contamination


def write_seed(tmp_path: Path, leaked: str) -> Path:
    seed = tmp_path / "seed.jsonl"
    rows = [{"instruction": "Describe how bread dough rises and what yeast does during proofing.",
             "response": "Yeast."},
            {"instruction": leaked, "response": "A copied evaluation prompt."}]
    seed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return seed


def test_hub_only_run_checks_alpaca_prompts_from_the_hub(tmp_path, hub):
    records = alpaca_records("text_davinci_003")
    hub.put("alpaca_eval.json", records)
    cfg = load_config(None, [f"seed.path={write_seed(tmp_path, records[4]['instruction'])}",
                             f"eval.data_dir={tmp_path / 'nowhere'}", "eval.heldout_tasks=[]",
                             "eval.heldout_hub_tasks=[arc_easy]"])
    result = stages.prepare_seed(RunDir(tmp_path / "run"), cfg)
    stats = result.stats
    assert stats["kept"] == 1 and stats["contaminated"] == 1
    assert stats["checked_against"] == ["alpaca_eval"]
    assert stats["sources"] == {"alpaca_eval": "hub:tatsu-lab/alpaca_eval/alpaca_eval.json"}
    assert stats["not_checked"] == ["ifeval", "truthfulqa", "gsm8k", "lm_eval:arc_easy"]
    assert "not indexed" in stats["not_checked_reasons"]["lm_eval:arc_easy"]
    assert "not found" in stats["not_checked_reasons"]["gsm8k"]
    # The hub file's content is part of the seed stage's cache key.
    manifest = json.loads((result.path / "manifest.json").read_text())
    served = hub.root / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / COMMIT / "alpaca_eval.json"
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    assert manifest["settings"]["contamination"]["sets"] == {"alpaca_eval": digest}


def test_unreachable_hub_lists_alpaca_as_unchecked_with_the_reason(tmp_path, hub):
    hub.offline = True
    cfg = load_config(None, [f"seed.path={write_seed(tmp_path, 'Any instruction at all, written for this test only.')}",
                             f"eval.data_dir={tmp_path / 'nowhere'}"])
    stats = stages.prepare_seed(RunDir(tmp_path / "run"), cfg).stats
    assert stats["checked_against"] == [] and stats["kept"] == 2
    assert set(stats["not_checked"]) == {"alpaca_eval", "ifeval", "truthfulqa", "gsm8k"}
    assert "LocalEntryNotFoundError" in stats["not_checked_reasons"]["alpaca_eval"]


def test_local_data_keeps_the_local_alpaca_prompts(tmp_path, hub, eval_data):
    cfg = load_config(None, [f"seed.path={write_seed(tmp_path, 'Nothing to see here, a harmless instruction.')}",
                             f"eval.data_dir={eval_data}"])
    stats = stages.prepare_seed(RunDir(tmp_path / "run"), cfg).stats
    assert hub.calls == [] and stats["not_checked"] == []
    assert stats["sources"]["alpaca_eval"].startswith("local:")


# --------------------------------------------------------------------------- before a run starts


ALPACA_GATE = "gate.metrics=[{metric: alpaca_eval/win_rate, abs_tol: 5.0}]"


def hub_only(tmp_path: Path, *extra: str):
    return load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.heldout_tasks=[]", ALPACA_GATE, *extra])


def test_hub_only_config_needs_no_local_folder(tmp_path, hub):
    hub.put("alpaca_eval.json", alpaca_records("text_davinci_003"))
    evaluate.check_eval_inputs(hub_only(tmp_path))
    assert [c["filename"] for c in hub.calls] == ["alpaca_eval.json"]  # fetched up front, into the cache


def test_hub_only_config_offline_fails_naming_both(tmp_path, hub):
    hub.offline = True
    with pytest.raises(DataError) as err:
        evaluate.check_eval_inputs(hub_only(tmp_path))
    assert "nowhere" in str(err.value) and "LocalEntryNotFoundError" in str(err.value)
    assert "eval.enabled=false" in str(err.value)


def test_local_heldout_tasks_still_need_the_folder(tmp_path, hub):
    hub.put("alpaca_eval.json", alpaca_records("text_davinci_003"))
    cfg = load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match=r"nowhere.*local held-out tasks"):
        evaluate.check_eval_inputs(cfg)
    cfg = load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.alpaca_source=local"])
    with pytest.raises(DataError, match="does not exist"):
        evaluate.check_eval_inputs(cfg)
    assert hub.calls == []


def test_hub_task_names_are_checked_up_front(tmp_path, hub, monkeypatch):
    from evals import hub_tasks

    monkeypatch.setattr(hub_tasks, "stock_task_names", lambda: ("arc_easy", "social_iqa", "piqa"))
    hub.put("alpaca_eval.json", alpaca_records("text_davinci_003"))
    evaluate.check_eval_inputs(hub_only(tmp_path, "eval.heldout_hub_tasks=[arc_easy, piqa]"))
    with pytest.raises(DataError, match=r"'siqa' \(did you mean social_iqa"):
        evaluate.check_eval_inputs(hub_only(tmp_path, "eval.heldout_hub_tasks=[arc_easy, siqa]"))


def test_gates_on_tasks_that_are_not_evaluated_fail_up_front(tmp_path, hub):
    hub.put("alpaca_eval.json", alpaca_records("text_davinci_003"))
    cfg = load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.heldout_tasks=[]"])  # default gates
    gated = r"gate.metrics names \['ifeval/prompt_level_loose_acc', 'truthfulqa_mc2/acc'\]"
    with pytest.raises(DataError, match=gated):
        evaluate.check_eval_inputs(cfg)
    evaluate.check_eval_inputs(load_config(None, [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.heldout_tasks=[]",
                                                  "gate.enabled=false"]))


def test_cli_exits_3_before_any_work_when_hub_and_folder_fail(tmp_path, hub, capsys):
    from harness.cli import EXIT_DATA, main

    hub.offline = True
    code = main(["iterate", "--run-dir", str(tmp_path / "run"), f"eval.data_dir={tmp_path / 'nowhere'}",
                 "eval.heldout_tasks=[]", ALPACA_GATE])
    assert code == EXIT_DATA
    err = capsys.readouterr().err
    assert "nowhere" in err and "alpaca_eval.json" in err and "LocalEntryNotFoundError" in err
    assert not (tmp_path / "run" / "seed").exists()


def test_eval_settings_change_only_when_the_hub_is_used(tmp_path, eval_data):
    local = evaluate.eval_settings(load_config(None, [f"eval.data_dir={eval_data}"]))
    assert not {"alpaca_source", "alpaca_hub_revision", "heldout_hub_tasks"} & set(local)
    remote = evaluate.eval_settings(hub_only(tmp_path, "eval.alpaca_hub_revision=abc",
                                             "eval.heldout_hub_tasks=[mmlu]", "eval.heldout_hub_num_fewshot={mmlu: 5}"))
    assert remote["alpaca_source"] == "hub" and remote["alpaca_hub_revision"] == "abc"
    assert remote["heldout_hub_tasks"] == ["mmlu"] and remote["heldout_hub_num_fewshot"] == {"mmlu": 5}


def test_heldout_batch_size_is_in_the_eval_settings(eval_data):
    unset = evaluate.eval_settings(load_config(None, [f"eval.data_dir={eval_data}"]))
    assert unset["heldout_batch_size"] is None
    four = evaluate.eval_settings(load_config(None, [f"eval.data_dir={eval_data}", "eval.heldout_batch_size=4"]))
    assert four == {**unset, "heldout_batch_size": 4}
