"""Streamed unlabelled sources (``hub-stream:``), offline: a packaged builder on local files goes
through the same ``datasets.load_dataset(..., streaming=True)`` call a hub dataset does."""

from __future__ import annotations

import json

import pytest

from pipeline import hub_stream
from pipeline.data import DataError, load_documents, resolve_source, source_fingerprint


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parse_keys_and_errors():
    s = hub_stream.parse("hub-stream:allenai/c4?config=en&split=validation&field=body&revision=abc&limit=7")
    assert (s.dataset, s.config, s.split, s.field, s.revision, s.limit) == ("allenai/c4", "en", "validation", "body", "abc", 7)
    assert hub_stream.parse("hub-stream:allenai/c4").split == "train"
    for bad, match in [("hub-stream:", "no dataset"), ("hub-stream:a/b?colour=red", "unknown key"),
                       ("hub-stream:a/b?limit=x", "whole number"), ("hub-stream:a/b?limit=0", "at least 1"),
                       ("hub-stream:a/b?split=a&split=b", "twice"), ("hub-stream:json", "needs data_files"),
                       ("hub-stream:a/b?data_files=x.jsonl", "packaged builders")]:
        with pytest.raises(DataError, match=match):
            hub_stream.parse(bad)


def test_hub_call_arguments(monkeypatch):
    """The one line that reaches the hub: streaming, config, split and revision passed through."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or iter([{"text": "x"}]))
    monkeypatch.setattr(hub_stream, "_hub_commit", lambda parsed: ("f" * 40, None))
    loaded = load_documents(["hub-stream:allenai/c4?config=en&revision=main&limit=5"], "text")
    assert calls == [(("allenai/c4", "en"), {"split": "train", "streaming": True, "revision": "main"})]
    info = loaded.sources["hub-stream:allenai/c4?config=en&revision=main&limit=5"]
    assert info["commit"] == "f" * 40 and info["dataset"] == "allenai/c4" and info["config"] == "en"
    assert info["records_read"] == 1 and info["stopped"] == "end of stream"


def test_limit_field_and_rejects_through_datasets(tmp_path):
    rows = [{"body": f"document {i}", "text": "not this one"} for i in range(3)]
    rows += [{"text": "no body"}, {"body": 5}, {"body": "   "}, {"body": "document 6"}, {"body": "document 7"}]
    _jsonl(tmp_path / "web.jsonl", rows)
    spec = f"hub-stream:json?data_files={tmp_path / 'web.jsonl'}&field=body&limit=7"
    loaded = load_documents([spec], "text")
    assert [r["text"] for r in loaded.rows] == ["document 0", "document 1", "document 2", "document 6"]
    reasons = [r.reason for r in loaded.rejects]
    assert len(reasons) == 3 and "NoneType" in reasons[0] and "int" in reasons[1] and "empty" in reasons[2]
    assert [r.line for r in loaded.rejects] == [3, 4, 5]
    info = loaded.sources[spec]
    assert info["field"] == "body" and info["records_read"] == 7 and info["kept"] == 4 and info["rejected"] == 3
    assert info["stopped"] == "limit of 7 records" and info["data_files"] == [str(tmp_path / "web.jsonl")]
    assert "commit" not in info  # local files: no hub repository


def test_unlabelled_limit_stops_the_stream_and_later_sources(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(50)])
    first = f"hub-stream:json?data_files={tmp_path / 'a.jsonl'}"
    second = f"hub-stream:json?data_files={tmp_path / 'missing-*.jsonl'}"
    loaded = load_documents([first, second], "text", limit=10)
    assert len(loaded.rows) == 10
    assert loaded.sources[first]["stopped"].startswith("unlabelled.limit") and loaded.sources[first]["records_read"] == 10
    assert loaded.sources[second]["stopped"].startswith("not opened")


def test_undecodable_record_ends_the_stream_as_a_reject(tmp_path):
    _jsonl(tmp_path / "a_good.jsonl", [{"text": "kept one"}, {"text": "kept two"}])
    _jsonl(tmp_path / "b_bad.jsonl", [{"text": "in the broken file"}, "not json at all"])
    _jsonl(tmp_path / "c_never.jsonl", [{"text": "after the break"}])
    spec = f"hub-stream:json?data_files={tmp_path}/*.jsonl"
    loaded = load_documents([spec], "text")
    # datasets cannot skip a line it cannot parse: the stream ends there, with a reject saying so
    assert [r["text"] for r in loaded.rows] == ["kept one", "kept two"]
    assert len(loaded.rejects) == 1 and loaded.rejects[0].reason.startswith("stream error: ArrowInvalid")
    assert loaded.sources[spec]["stopped"].startswith("after record 2: stream error")


def test_nothing_usable_is_an_error(tmp_path):
    _jsonl(tmp_path / "x.jsonl", [{"other": "a"}])
    with pytest.raises(DataError, match="no usable documents"):
        load_documents([f"hub-stream:json?data_files={tmp_path / 'x.jsonl'}"], "text")
    with pytest.raises(DataError, match="no file matches"):
        load_documents([f"hub-stream:json?data_files={tmp_path / 'none.jsonl'}"], "text")


def test_resolve_and_fingerprint_follow_local_files(tmp_path):
    (tmp_path / "web").mkdir()
    path = _jsonl(tmp_path / "web" / "a.jsonl", [{"text": "one"}])
    spec = resolve_source("hub-stream:json?data_files=web/a.jsonl&limit=3", tmp_path)
    assert spec == f"hub-stream:json?data_files={path}&limit=3"
    before = source_fingerprint(spec)
    _jsonl(path, [{"text": "two"}])
    assert source_fingerprint(spec) != before
    hub = "hub-stream:allenai/c4?config=en"
    assert resolve_source(hub, tmp_path) == hub and source_fingerprint(hub) == hub


def test_corpus_stage_records_what_the_stream_read(tmp_path):
    from harness.cli import main

    docs = [{"text": f"Paragraph {i} about topic {i}. " + " ".join(f"w{i}x{j}" for j in range(60))} for i in range(6)]
    _jsonl(tmp_path / "web.jsonl", docs + [{"title": "no text"}])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "run": {"name": "stream", "root": str(tmp_path / "runs")}, "eval": {"enabled": False}, "gate": {"enabled": False},
        "unlabelled": {"path": "hub-stream:json?data_files=web.jsonl&limit=5"}, "data": {"dir": str(tmp_path)},
        "corpus": {"min_chars": 100, "max_chars": 2000}}))
    assert main(["stage", "corpus", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    manifest = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    (spec, read), = manifest["stats"]["sources_read"].items()
    assert spec == f"hub-stream:json?data_files={tmp_path / 'web.jsonl'}&limit=5"
    assert read["records_read"] == 5 and read["stopped"] == "limit of 5 records" and read["streaming"] is True
    assert manifest["stats"]["documents"] == 5
