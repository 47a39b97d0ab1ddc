"""``humpback prepare-seed --oasst1``: write the paper's oasst1 seed as a seed file the loop reads.

Writes ``OUT`` (JSONL: instruction, response and provenance ids; point ``seed.path`` at it) and,
beside it, ``<stem>.counts.json`` (messages read, pairs kept, messages removed per role and
reason, records rejected per reason), ``<stem>.removed.jsonl`` (every removed message id with its
reason) and ``<stem>.rejects.jsonl`` (unusable records with file, line and reason).

Run as: humpback prepare-seed --oasst1 hub:OpenAssistant/oasst1:train --out data/paper-7b/seed/oasst1_en_rank0.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT_DATA = 3


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare-seed", help="write the paper's seed (oasst1 first turns, English, rank-0 replies) as a JSONL file",
        description="Select from OpenAssistant oasst1 messages the first turn of every conversation tree: the root "
                    "prompt and its rank-0 (best-ranked) assistant reply, both in English (lang 'en'), neither "
                    "deleted, failed in review or synthetic, neither empty. Every other message is counted by "
                    "role and reason, and every unusable record is listed with its file and line. Use the written "
                    "file as seed.path (e.g. configs/paper-7b.yaml). Do not use the validation split: AlpacaEval "
                    "includes oasst1 validation prompts.",
        epilog="Example: humpback prepare-seed --oasst1 hub:OpenAssistant/oasst1:train --out "
               "data/paper-7b/seed/oasst1_en_rank0.jsonl")
    p.add_argument("--oasst1", nargs="+", required=True, metavar="SOURCE",
                   help="oasst1 message files (.jsonl, .json, .csv, .parquet, optionally .gz) or "
                        "hub:<dataset>[:split], read as a stream (e.g. hub:OpenAssistant/oasst1:train)")
    p.add_argument("--out", required=True, help="the seed JSONL to write; counts, removed and rejects go beside it")


def outputs(out: Path) -> dict[str, Path]:
    """The files one preparation writes."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {"seed": out, "counts": out.with_name(stem + ".counts.json"),
            "removed": out.with_name(stem + ".removed.jsonl"), "rejects": out.with_name(stem + ".rejects.jsonl")}


def run(args) -> int:
    from pipeline.data import DataError
    from pipeline.io import write_json_atomic, write_jsonl
    from pipeline.oasst import prepare_oasst_seed

    if any(s.rstrip().endswith(":validation") for s in args.oasst1):
        print("warning: the oasst1 validation split holds AlpacaEval prompts; the seed stage will drop the "
              "overlapping pairs as contaminated", file=sys.stderr)
    try:
        seed = prepare_oasst_seed(args.oasst1)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    files = outputs(Path(args.out))
    counts = {**seed.counts(), "sources": list(args.oasst1)}
    write_jsonl(files["seed"], seed.pairs)
    write_jsonl(files["removed"], seed.removed_ids)
    write_jsonl(files["rejects"], (r.as_row() for r in seed.rejects))
    write_json_atomic(files["counts"], counts)
    print(json.dumps(counts, indent=2))
    print(f"written: {', '.join(str(p) for p in files.values())}")
    return 0
