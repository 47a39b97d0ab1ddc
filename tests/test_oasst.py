"""The oasst1 seed preparer: first turns, English, rank 0, and every message accounted for."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.cli import main
from pipeline.data import DataError, load_pairs
from pipeline.oasst import prepare_oasst_seed, read_messages, select_first_turns


def msg(mid, parent, role, text, lang="en", rank=None, tree=None, **extra):
    row = {"message_id": mid, "parent_id": parent, "message_tree_id": tree or (mid if parent is None else "t?"),
           "role": role, "text": text, "lang": lang, "rank": rank, "deleted": False, "review_result": True,
           "synthetic": False}
    row.update(extra)
    return row


def trees():
    """Several small message trees covering each way a message is kept or removed."""
    return [
        # tree A: a root with three ranked replies, and a second turn below the best one
        msg("a", None, "prompter", "What is a whale?"),
        msg("a1", "a", "assistant", "A large marine mammal.", rank=0, tree="a"),
        msg("a2", "a", "assistant", "A fish.", rank=1, tree="a"),
        msg("a3", "a", "assistant", "Big.", rank=2, tree="a"),
        msg("a4", "a1", "prompter", "Tell me more.", tree="a"),
        msg("a5", "a4", "assistant", "They breathe air.", rank=0, tree="a"),  # a reply to a reply
        # tree B: a German conversation
        msg("b", None, "prompter", "Was ist ein Wal?", lang="de"),
        msg("b1", "b", "assistant", "Ein Meeressäuger.", lang="de", rank=0, tree="b"),
        # tree C: the best reply was deleted, the next one is rank 1: no pair
        msg("c", None, "prompter", "Name a prime."),
        msg("c1", "c", "assistant", "Seven.", rank=0, tree="c", deleted=True),
        msg("c2", "c", "assistant", "Four.", rank=1, tree="c"),
        # tree D: kept, with a reply that failed review and one still unranked
        msg("d", None, "prompter", "  Say hello.  "),
        msg("d1", "d", "assistant", "Hello!", rank=0, tree="d"),
        msg("d2", "d", "assistant", "Go away.", rank=None, tree="d", review_result=False),
        msg("d3", "d", "assistant", "Hi.", rank=None, tree="d"),
        # tree E: an English prompt answered in Spanish
        msg("e", None, "prompter", "Translate 'cat'."),
        msg("e1", "e", "assistant", "Gato, en español.", lang="es", rank=0, tree="e"),
        # tree F: an empty prompt; an orphan reply whose parent is not in the data
        msg("f", None, "prompter", "   "),
        msg("f1", "f", "assistant", "Nothing to answer.", rank=0, tree="f"),
        msg("g1", "missing", "assistant", "Orphan.", rank=0, tree="g"),
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_first_turn_english_rank_0_pairs_only(tmp_path):
    seed = select_first_turns(read_messages([write_jsonl(tmp_path / "m.jsonl", trees())]))
    assert [(p["prompt_id"], p["reply_id"]) for p in seed.pairs] == [("a", "a1"), ("d", "d1")]
    assert seed.pairs[1]["instruction"] == "Say hello."  # stripped, as the seed loader strips
    assert seed.pairs[0]["response"] == "A large marine mammal."
    assert seed.pairs[0]["message_tree_id"] == "a" and seed.pairs[0]["origin"].endswith("m.jsonl:1")


def test_every_message_is_kept_or_counted_by_reason(tmp_path):
    rows = trees()
    seed = select_first_turns(read_messages([write_jsonl(tmp_path / "m.jsonl", rows)]))
    counts = seed.counts()
    assert counts["removed"]["prompter"] == {"empty_text": 1, "no_rank_0_reply": 2, "not_english": 1, "not_root": 1}
    assert counts["removed"]["assistant"] == {
        "deleted": 1, "not_english": 1, "not_first_turn": 1, "not_rank_0": 3, "parent_missing": 1,
        "prompt_removed": 2, "review_failed": 1, "unranked": 1}
    assert counts["messages"] == len(rows) == 2 * counts["pairs"] + counts["removed_total"]
    assert counts["accounted"] is True
    by_id = {r["message_id"]: r["reason"] for r in seed.removed_ids}
    assert by_id["a5"] == "not_first_turn" and by_id["c"] == "no_rank_0_reply" and by_id["b1"] == "prompt_removed"
    assert set(by_id) | {"a", "a1", "d", "d1"} == {r["message_id"] for r in rows}


def test_malformed_records_are_rejects_naming_file_line_and_reason(tmp_path):
    good = trees()[:2]
    bad = [
        {"parent_id": None, "role": "prompter", "text": "no id", "lang": "en"},        # line 3
        msg("x", None, "prompter", 42),                                               # line 4: text not text
        msg("y", None, "moderator", "Hi"),                                            # line 5: unknown role
        msg("z", "a", "assistant", "Sure", rank="0"),                                 # line 6: rank as text
        msg("w", "a", "assistant", "Sure", rank=True),                                # line 7: rank as bool
        msg("v", None, "prompter", "Hi", deleted="no"),                               # line 8: flag not bool
        msg("a", None, "prompter", "What is a whale?"),                               # line 9: id seen before
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "{broken\n", encoding="utf-8")
    seed = select_first_turns(read_messages([str(path)]))
    reasons = {r.line: r.reason for r in seed.rejects}
    assert reasons[3] == "missing field 'message_id'"
    assert reasons[4] == "bad type: field 'text' is int, not str"
    assert reasons[5].startswith("bad role: 'moderator'")
    assert reasons[6].startswith("bad type: field 'rank' is '0'")
    assert reasons[7].startswith("bad type: field 'rank' is True")
    assert reasons[8] == "bad type: field 'deleted' is str, not bool"
    assert reasons[9].startswith("duplicate message_id: 'a' first read at") and reasons[9].endswith("m.jsonl:1")
    assert reasons[10].startswith("malformed JSON")
    assert all(r.file == str(path) for r in seed.rejects)
    assert len(seed.pairs) == 1 and seed.counts()["rejected_records"] == 8


def test_optional_fields_may_be_missing_and_trees_may_span_files(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("deleted", "review_result", "synthetic", "message_tree_id")}
            for r in trees()]
    for r in rows:  # ranks through a float column, nulls as NaN, as pandas writes them
        r["rank"] = float("nan") if r["rank"] is None else float(r["rank"])
    first = write_jsonl(tmp_path / "part1.jsonl", rows[:1])
    table = pa.Table.from_pylist(rows[1:])
    pq.write_table(table, tmp_path / "part2.parquet")
    seed = select_first_turns(read_messages([first, str(tmp_path / "part2.parquet")]))
    # without the deleted and review fields the deleted c1 is kept, and c has its pair
    assert [(p["prompt_id"], p["reply_id"]) for p in seed.pairs] == [("a", "a1"), ("c", "c1"), ("d", "d1")]
    assert seed.pairs[0]["message_tree_id"] == "a"  # the root's id stands in for a missing tree id
    assert seed.counts()["accounted"] is True
    assert seed.counts()["removed"]["assistant"]["unranked"] == 2  # d2 and d3: NaN read as no rank


def test_no_pair_is_a_data_error(tmp_path):
    only_german = [r for r in trees() if r["message_id"].startswith("b")]
    with pytest.raises(DataError, match="no oasst1 seed pairs.*not_english"):
        prepare_oasst_seed([write_jsonl(tmp_path / "de.jsonl", only_german)])


def test_cli_writes_a_seed_the_loader_reads_and_the_counts(tmp_path, capsys):
    src = write_jsonl(tmp_path / "m.jsonl", trees() + [msg("bad", None, "prompter", None)])
    out = tmp_path / "seed" / "oasst1.jsonl"
    assert main(["prepare-seed", "--oasst1", src, "--out", str(out)]) == 0
    counts = json.loads((tmp_path / "seed" / "oasst1.counts.json").read_text())
    assert counts["pairs"] == 2 and counts["rejected_records"] == 1 and counts["sources"] == [src]
    removed = [json.loads(x) for x in (tmp_path / "seed" / "oasst1.removed.jsonl").read_text().splitlines()]
    assert len(removed) == counts["removed_total"]
    rejects = [json.loads(x) for x in (tmp_path / "seed" / "oasst1.rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["line"] == len(trees()) + 1 and "'text'" in rejects[0]["reason"]
    loaded = load_pairs([str(out)], "instruction", "response")
    assert [r["instruction"] for r in loaded.rows] == ["What is a whale?", "Say hello."] and not loaded.rejects
    assert '"pairs": 2' in capsys.readouterr().out


def test_cli_no_pairs_exits_3(tmp_path, capsys):
    src = write_jsonl(tmp_path / "m.jsonl", [msg("b", None, "prompter", "Hallo", lang="de")])
    assert main(["prepare-seed", "--oasst1", src, "--out", str(tmp_path / "s.jsonl")]) == 3
    assert "no oasst1 seed pairs" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()
