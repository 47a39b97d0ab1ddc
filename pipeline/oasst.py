"""The paper's seed from OpenAssistant oasst1: first-turn pairs, English, the best-ranked reply.

oasst1 is a flat table of messages that form trees: a prompter message without a parent opens a
conversation, assistant messages answer it (``rank`` 0 is the reply its annotators ranked best),
and so on down. The seed of the paper (Li et al. 2023, section 3, "Seed data") is the first turn
of each tree: the root prompt and its rank-0 reply, both in English. Every message read lands in
exactly one bucket: part of a kept pair, or removed for one named reason (counted per role, and
listed by message id); a record that is not a usable message at all is a :class:`Reject` naming
its file and line, as the seed loader's rejects do.

Run as: humpback prepare-seed --oasst1 hub:OpenAssistant/oasst1:train --out data/seed/oasst1_en_rank0.jsonl
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from pipeline.data import DataError, Record, Reject, _preview, read_source

LANG = "en"
REQUIRED = {"message_id": str, "role": str, "text": str, "lang": str}
"""Fields every message must have, with their types (``parent_id`` and ``rank`` may be null)."""
OPTIONAL_FLAGS = ("deleted", "review_result", "synthetic")
"""Boolean fields that are checked when present (null is read as absent: a message not yet
reviewed is not one that failed review)."""
ROLES = ("prompter", "assistant")


@dataclass
class OasstSeed:
    """The seed pairs, what removed every other message, and the unusable records."""

    pairs: list[dict[str, Any]]
    removed: dict[str, Counter] = field(default_factory=lambda: {r: Counter() for r in ROLES})
    removed_ids: list[dict[str, str]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    messages: int = 0

    def counts(self) -> dict[str, Any]:
        removed = {role: dict(sorted(c.items())) for role, c in self.removed.items()}
        accounted = 2 * len(self.pairs) + sum(sum(c.values()) for c in self.removed.values())
        return {
            "messages": self.messages,
            "pairs": len(self.pairs),
            "removed": removed,
            "removed_total": sum(sum(c.values()) for c in self.removed.values()),
            "rejected_records": len(self.rejects),
            "reject_reasons": dict(sorted(Counter(r.reason.split(":")[0] for r in self.rejects).items())),
            "accounted": accounted == self.messages,
        }


def _check(record: Record) -> dict[str, Any] | Reject:
    """The message as a dict of the fields used, or a reject saying what is wrong with it."""
    data = record.data
    for name, kind in REQUIRED.items():
        if name not in data:
            return Reject(record.file, record.line, f"missing field {name!r}", _preview(data))
        if not isinstance(data[name], kind):
            return Reject(record.file, record.line,
                          f"bad type: field {name!r} is {type(data[name]).__name__}, not {kind.__name__}",
                          _preview(data))
    if data["role"] not in ROLES:
        return Reject(record.file, record.line, f"bad role: {data['role']!r} (expected prompter or assistant)",
                      _preview(data))
    parent = data.get("parent_id")
    if parent is not None and not isinstance(parent, str):
        return Reject(record.file, record.line, f"bad type: field 'parent_id' is {type(parent).__name__}, not text",
                      _preview(data))
    rank = data.get("rank")
    if isinstance(rank, float) and math.isnan(rank):
        rank = None  # a null rank written through a float column (pandas)
    # bool is an int in Python; a rank of True is a broken record, not rank 1.
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank)
                             or rank != int(rank)):
        return Reject(record.file, record.line, f"bad type: field 'rank' is {rank!r}, not a whole number",
                      _preview(data))
    msg = {"message_id": data["message_id"], "parent_id": parent, "role": data["role"], "text": data["text"],
           "lang": data["lang"], "rank": None if rank is None else int(rank),
           "message_tree_id": data.get("message_tree_id"), "origin": f"{record.file}:{record.line}"}
    for flag in OPTIONAL_FLAGS:
        value = data.get(flag)
        if value is not None and not isinstance(value, bool):
            return Reject(record.file, record.line, f"bad type: field {flag!r} is {type(value).__name__}, not bool",
                          _preview(data))
        msg[flag] = value
    return msg


def _own_reason(msg: dict[str, Any]) -> str | None:
    """Why a message cannot be part of a seed pair on its own account (None: it can)."""
    if msg["deleted"]:
        return "deleted"
    if msg["review_result"] is False:
        return "review_failed"
    if msg["synthetic"]:
        return "synthetic"
    if msg["lang"] != LANG:
        return "not_english"
    if not msg["text"].strip():
        return "empty_text"
    if "\x00" in msg["text"]:
        return "nul_bytes"
    return None


def select_first_turns(items: Iterable[Record | Reject]) -> OasstSeed:
    """Seed pairs from oasst1 messages: each English root prompt with its English rank-0 reply.

    Args:
        items: records (and rejects) as :func:`pipeline.data.read_source` yields them.

    Returns:
        The pairs in the order their prompts were read, each with ``instruction``, ``response``
        and provenance (``message_tree_id``, ``prompt_id``, ``reply_id``, ``origin``); removed
        messages counted by role and reason (``not_root``, ``not_first_turn``, ``not_english``,
        ``deleted``, ``review_failed``, ``synthetic``, ``empty_text``, ``unranked``, ``not_rank_0``,
        ``no_rank_0_reply``, ``prompt_removed``, ``parent_missing``, ``duplicate_rank_0``); and
        rejects for records that are not usable messages (``duplicate message_id`` included).
        A message removed for several reasons is counted under the first that applies, in the
        order of the code below (its place in the tree first, then its own flags, then its rank).
    """
    out = OasstSeed(pairs=[])
    messages: dict[str, dict[str, Any]] = {}
    for item in items:
        if isinstance(item, Reject):
            out.rejects.append(item)
            continue
        msg = _check(item)
        if isinstance(msg, Reject):
            out.rejects.append(msg)
        elif msg["message_id"] in messages:
            out.rejects.append(Reject(item.file, item.line,
                                      f"duplicate message_id: {msg['message_id']!r} first read at "
                                      f"{messages[msg['message_id']]['origin']}", _preview(item.data)))
        else:
            messages[msg["message_id"]] = msg
    out.messages = len(messages)

    def remove(msg: dict[str, Any], reason: str) -> None:
        out.removed[msg["role"]][reason] += 1
        out.removed_ids.append({"message_id": msg["message_id"], "role": msg["role"], "reason": reason})

    roots = {mid: m for mid, m in messages.items() if m["role"] == "prompter" and m["parent_id"] is None}
    usable_roots = {mid for mid, m in roots.items() if _own_reason(m) is None}
    best: dict[str, dict[str, Any]] = {}
    for msg in messages.values():
        if msg["role"] == "prompter":
            if msg["parent_id"] is not None:
                remove(msg, "not_root")
            elif (reason := _own_reason(msg)) is not None:
                remove(msg, reason)
            continue
        parent = msg["parent_id"]
        if parent is None or parent not in messages:
            remove(msg, "parent_missing")
        elif parent not in roots:
            remove(msg, "not_first_turn")
        elif parent not in usable_roots:
            remove(msg, "prompt_removed")
        elif (reason := _own_reason(msg)) is not None:
            remove(msg, reason)
        elif msg["rank"] is None:
            remove(msg, "unranked")
        elif msg["rank"] != 0:
            remove(msg, "not_rank_0")
        elif parent in best:
            remove(msg, "duplicate_rank_0")  # two best replies: keep the first read, count the other
        else:
            best[parent] = msg
    for mid in roots:
        if mid in usable_roots and mid not in best:
            remove(roots[mid], "no_rank_0_reply")
        elif mid in best:
            prompt, reply = roots[mid], best[mid]
            out.pairs.append({"instruction": prompt["text"].strip(), "response": reply["text"].strip(),
                              "message_tree_id": prompt["message_tree_id"] or mid, "prompt_id": mid,
                              "reply_id": reply["message_id"], "origin": prompt["origin"]})
    return out


def read_messages(sources: list[str]) -> Iterator[Record | Reject]:
    """Every record of the given sources: files as the seed loader reads them (JSONL, JSON, CSV,
    Parquet, optionally gzipped), or ``hub:<dataset>[:split]`` read as a stream (nothing but the
    split's own files is downloaded, and nothing is kept in a second copy)."""
    for source in sources:
        if source.startswith("hub:"):
            yield from _stream_hub(source[4:])
        else:
            yield from read_source(source)


def _stream_hub(spec: str) -> Iterator[Record | Reject]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        stream = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - the hub, the network or the name: say which source
        raise DataError(f"hub:{spec}: cannot open the dataset ({type(exc).__name__}: {exc})") from exc
    for index, row in enumerate(stream):
        yield Record(f"hub:{spec}", index, dict(row))


def prepare_oasst_seed(sources: list[str]) -> OasstSeed:
    """Read oasst1 messages from ``sources`` and select the seed; an error if no pair is left."""
    seed = select_first_turns(read_messages(sources))
    if not seed.pairs:
        first = seed.rejects[0].reason if seed.rejects else "no records"
        raise DataError(f"no oasst1 seed pairs in {', '.join(sources)}: {seed.messages} messages read, removed "
                        f"{seed.counts()['removed']}, {len(seed.rejects)} records rejected (first: {first})")
    return seed
