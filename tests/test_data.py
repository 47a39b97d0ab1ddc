import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data import DataError, load_documents, load_pairs, read_source, resolve_source


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_jsonl_bad_records_become_rejects_with_line_and_reason(tmp_path):
    path = _write(
        tmp_path / "seed.jsonl",
        [
            json.dumps({"instruction": "Say hi", "response": "Hi!"}).encode(),
            b'{"instruction": "broken", ',
            json.dumps({"instruction": "", "response": "x"}).encode(),
            json.dumps({"instruction": "q", "response": 3}).encode(),
            json.dumps({"response": "no instruction"}).encode(),
            b"\xff\xfe not utf8",
            json.dumps(["a", "list"]).encode(),
            json.dumps({"instruction": "Say hi", "response": "Hi!"}).encode(),
            json.dumps({"instruction": "Count", "response": "1 2 3"}).encode(),
        ],
    )
    loaded = load_pairs([path], "instruction", "response")
    assert [r["instruction"] for r in loaded.rows] == ["Say hi", "Count"]
    reasons = {r.line: r.reason for r in loaded.rejects}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[3] == "field 'instruction' is empty"
    assert reasons[4] == "field 'response' is int, not text"
    assert reasons[5] == "missing field 'instruction'"
    assert reasons[6].startswith("not UTF-8")
    assert reasons[7] == "record is a JSON list, not an object"
    assert reasons[8] == "duplicate pair"
    assert all(r.file == path for r in loaded.rejects)
    stats = loaded.stats()
    assert stats["kept"] == 2 and stats["rejected"] == 7
    assert stats["reject_reasons"]["malformed JSON"] == 1


def test_custom_field_names_and_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,completion\nWhat is 2+2?,4\n,empty prompt\n", encoding="utf-8")
    loaded = load_pairs([str(path)], "prompt", "completion")
    assert loaded.rows[0]["instruction"] == "What is 2+2?" and loaded.rows[0]["response"] == "4"
    assert loaded.rejects[0].line == 3 and "empty" in loaded.rejects[0].reason


def test_json_list_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "docs.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, 5]))
    pq.write_table(pa.table({"body": ["three", None]}), tmp_path / "docs.parquet")
    a = load_documents([str(tmp_path / "docs.json")], "text")
    assert [r["text"] for r in a.rows] == ["one", "two"] and len(a.rejects) == 1
    b = load_documents([str(tmp_path / "docs.parquet")], "body")
    assert [r["text"] for r in b.rows] == ["three"] and "NoneType" in b.rejects[0].reason


def test_nothing_usable_names_the_file(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [b"not json", b'{"text": ""}'])
    with pytest.raises(DataError, match="bad.jsonl"):
        load_documents([path], "text")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_source(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown format"):
        list(read_source(str(tmp_path / "x.txt")))


def test_resolve_source_uses_data_dir(tmp_path):
    assert resolve_source("seed/a.jsonl", tmp_path) == str(tmp_path / "seed" / "a.jsonl")
    assert resolve_source("/abs/a.jsonl", tmp_path) == "/abs/a.jsonl"
    assert resolve_source("hub:org/name:train", tmp_path) == "hub:org/name:train"


def test_packaged_sources():
    seed = load_pairs(["resource:demo_seed.jsonl"], "instruction", "response")
    assert len(seed.rows) >= 40 and not seed.rejects
    docs = load_documents(["pydoc:topics"], "text")
    assert len(docs.rows) > 50


def test_real_gzipped_json_loads_as_pairs(eval_data):
    """A real public file read through the .gz path: AlpacaEval's 805 instructions with the
    reference answers as responses. Two of text_davinci_003's answers are empty; they are
    rejected with the record and the reason, not dropped."""
    ref = load_pairs([str(eval_data / "alpaca_eval" / "reference_text_davinci_003.json.gz")], "instruction", "output")
    assert len(ref.rows) == 803
    assert [(r.reason, r.file.endswith(".json.gz")) for r in ref.rejects] == [("field 'output' is empty", True)] * 2


def test_corrupt_gzip_names_the_file(tmp_path):
    bad = tmp_path / "seed.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="seed.jsonl.gz: not a readable gzip file"):
        list(read_source(str(bad)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=80).filter(lambda b: b"\n" not in b), min_size=1, max_size=12))
def test_every_nonblank_line_is_kept_or_rejected(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    items = list(read_source(str(path)))
    # A UTF-8 byte-order mark at the very start is the file's encoding marker, not content.
    first = lines[0].removeprefix(b"\xef\xbb\xbf")
    nonblank = [x for x in [first, *lines[1:]] if x.strip()]
    assert len(items) == len(nonblank)


def test_a_line_holding_only_the_bom_is_blank(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"text": "kept"}).encode())
    assert [i.data for i in read_source(str(path))] == [{"text": "kept"}]
