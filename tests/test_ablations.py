"""The ablation configs and what they need: select.k: all (uncurated), config files that extend
another, and each ablation being the demo plus its one difference."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ConfigError, load_config
from harness.rundir import RunDir, StageResult
from harness.stages import select_candidates
from pipeline.curate import select_pairs
from pipeline.io import read_jsonl, write_jsonl
from pipeline.settings import SelectSection

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CANDIDATES = [{"segment_id": f"s{i}", "instruction": f"Explain topic {i} of the reference in a few lines.",
               "response": f"Topic {i} is described here at some length. " * 4} for i in range(4)]
SCORES = [{"segment_id": "s0", "score": 4.8}, {"segment_id": "s1", "score": 1.2},
          {"segment_id": "s2", "score": None}, {"segment_id": "s3", "score": 3.0}]


def test_select_all_keeps_every_candidate_unscored_ones_too():
    kept, stats = select_pairs(CANDIDATES, SCORES, SelectSection(k="all"))
    assert [r["segment_id"] for r in kept] == ["s0", "s1", "s2", "s3"]
    assert [r["score"] for r in kept] == [4.8, 1.2, None, 3.0]
    assert stats["selected"] == 4 and stats["below_k"] == 0 and stats["unscored"] == 1 and stats["k"] == "all"
    kept, stats = select_pairs(CANDIDATES, SCORES, SelectSection(k=3.0))
    assert [r["segment_id"] for r in kept] == ["s0", "s3"] and stats["below_k"] == 1


def test_select_all_with_a_cap_is_a_config_error():
    with pytest.raises(ConfigError, match="max_pairs"):
        load_config(None, ["select.k=all", "select.max_pairs=4"])
    assert load_config(None, ["select.k=all", "select.max_pairs=null"]).select.k == "all"
    with pytest.raises(ConfigError, match="select.k"):
        load_config(None, ["select.k=some"])


def test_the_select_stage_with_k_all(tmp_path, eval_data):
    def upstream(name: str, file: str, rows: list[dict]) -> StageResult:
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / file, rows)
        return StageResult(name, folder, {"output_digest": name, "stats": {}})

    cfg = load_config(None, ["select.k=all", f"eval.data_dir={eval_data}"])
    result = select_candidates(RunDir(tmp_path / "run"), cfg, 1, upstream("augment", "candidates.jsonl", CANDIDATES),
                               upstream("curate", "scores.jsonl", SCORES))
    assert result.stats["selected"] == 4 and result.stats["k_source"].startswith("none")
    assert "curator" not in result.stats  # no threshold, so no precision or recall at k
    assert len(read_jsonl(result.path / "data.jsonl")) == 4


def test_a_config_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  name: base\n  seed: 3\nselect:\n  k: 4.5\n"
                                        "eval:\n  heldout_tasks: [ifeval, truthfulqa_mc2]\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\nrun:\n  name: child\neval:\n  heldout_tasks: [ifeval]\n")
    cfg = load_config(child, ["select.k=5"])
    assert cfg.run.name == "child" and cfg.run.seed == 3  # merged key by key
    assert cfg.eval.heldout_tasks == ["ifeval"]  # a list replaces the list
    assert cfg.select.k == 5  # overrides come last
    (tmp_path / "base.yaml").write_text("extends: sub/child.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(child)
    child.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(child)


ABLATIONS = {
    "curated": {},
    "seed-only": {"iterate.iterations": 0},
    "uncurated": {"select.k": "all", "select.max_pairs": None, "iterate.iterations": 1},
    "no-tags": {"finetune.seed_tag": "", "finetune.web_tag": "", "finetune.inference_tag": "none"},
}
SET_WIDE = {"gate.enabled": False, "tracking.experiment": "humpback/ablations", "tracking.register_model": None}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "tags":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_is_the_demo_plus_its_one_difference(name):
    demo = _flat(load_config(CONFIGS / "demo.yaml").model_dump(mode="json"))
    ablation = _flat(load_config(CONFIGS / "ablations" / f"{name}.yaml").model_dump(mode="json"))
    differ = {k: ablation[k] for k in ablation if ablation[k] != demo[k]}
    run_keys = {k: differ.pop(k) for k in list(differ) if k.startswith("run.")}
    assert differ == {**ABLATIONS[name], **SET_WIDE}
    assert run_keys["run.name"] == f"ablation-{name}" and run_keys["run.tags"] == {"ablation": name}
    others = [f"runs/ablation-{a}" for a in ABLATIONS if a != name]
    assert set(others) <= set(run_keys["run.share_stages_from"])
