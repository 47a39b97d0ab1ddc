import json
from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig, load_config, valid_keys

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))  # ablations/ too


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.corpus.min_chars == 600 and cfg.corpus.max_chars == 3000  # the paper's bounds
    assert cfg.augment.temperature == 0.7 and cfg.augment.top_p == 0.9
    assert cfg.iterate.iterations == 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name + "/" + p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert path.read_text().startswith("# Run as:")


def test_override_types_and_lists():
    cfg = load_config(None, ["select.k=4.5", "seed.path=a.jsonl", "unlabelled.path=[x.csv, y.parquet]",
                             "finetune.method=full"])
    assert cfg.select.k == 4.5
    assert cfg.seed.path == ["a.jsonl"]
    assert cfg.unlabelled.path == ["x.csv", "y.parquet"]
    assert cfg.finetune.method == "full"


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["select.kk=4"])
    msg = str(err.value)
    assert "select.kk" in msg and "select.k" in msg and "select.max_pairs" in msg


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("curate:\n  mdoe: logprob\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "curate.mdoe" in str(err.value) and "curate.mode" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [("corpus.min_chars=abc", "corpus.min_chars"), ("curate.mode=sampling", "curate.mode"),
     ("corpus.min_chars=5000", "min_chars"), ("augment.top_p=0", "augment.top_p")],
)
def test_wrong_values_are_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["select.k"])


def test_digest_changes_only_with_its_section():
    a = load_config(None)
    b = load_config(None, ["select.k=5"])
    assert a.digest("corpus") == b.digest("corpus")
    assert a.digest("select") != b.digest("select")


def test_every_key_is_settable():
    # Each documented key round-trips through an override of its current value, written as JSON
    # (which is YAML): lists, mappings and null included.
    dump = load_config(None).model_dump(mode="json")
    assert len(valid_keys()) > 50
    for key in valid_keys():
        section, name = key.split(".")
        value = dump[section][name]
        got = load_config(None, [f"{key}={json.dumps(value)}"]).model_dump(mode="json")[section][name]
        assert got == value, key


def test_an_override_changes_exactly_its_key():
    base = load_config(None).model_dump(mode="json")
    changed = load_config(None, ["curate.batch_size=3"]).model_dump(mode="json")
    assert changed["curate"]["batch_size"] == 3 and base["curate"]["batch_size"] != 3
    changed["curate"]["batch_size"] = base["curate"]["batch_size"]
    assert changed == base


def test_yaml_1_1_booleans_stay_words_where_a_string_is_wanted(tmp_path):
    assert load_config(None, ["tracking.uri=off"]).tracking.uri == "off"
    assert load_config(None, ["eval.enabled=false"]).eval.enabled is False
    assert load_config(None, ["eval.enabled=off"]).eval.enabled is False  # pydantic reads "off" as False
    path = tmp_path / "c.yaml"
    path.write_text("tracking:\n  uri: off\n")
    assert load_config(path).tracking.uri == "off"
