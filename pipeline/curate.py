"""Self-curation: the current model rates candidate pairs on the 5-point rubric; selection keeps
pairs that score at least k.

Two scoring modes. ``generate`` follows the paper: the model writes a short justification and
then "Score: N"; only its own continuation is parsed, and a rating that does not parse is
recorded as unscored (None), never given a default. ``logprob`` reads, in one forward pass, the
probabilities of the five score tokens after "Score:" and reports the expected score, so
fractional thresholds such as 4.5 mean something.

Both modes rate what :func:`pipeline.untrusted.guard` leaves of the pair (``curate.guard``): planted
rating text is taken out before the model sees it, and the pair is flagged with what was found.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from pipeline.settings import CurateSection, SelectSection
from pipeline.engine import Engine, SamplingParams
from pipeline.prompts import curation_messages, parse_score
from pipeline.untrusted import add_counts, guard

SCORES = ("1", "2", "3", "4", "5")
LOGPROB_PREFIX = "Score:"


def score_pairs(
    engine: Engine, pairs: Sequence[dict[str, Any]], cfg: CurateSection, system: str | None, seed: int
) -> list[dict[str, Any]]:
    """One row per pair with ``score`` (None when unscored) and the evidence behind it; a pair in
    which planted rating text was found and taken out carries ``flags`` (counts by kind)."""
    shown, flags = [], []
    for p in pairs:
        if cfg.guard:
            instruction, response = guard(p["instruction"]), guard(p["response"])
            shown.append((instruction.text, response.text))
            flags.append(add_counts(dict(instruction.found), response.found))
        else:
            shown.append((p["instruction"], p["response"]))
            flags.append({})
    if cfg.mode == "generate":
        chats = [curation_messages(i, r, cfg.template, system) for i, r in shown]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
        completions = engine.generate(chats, params)
        rows = [{"segment_id": p["segment_id"], "score": parse_score(c.text), "rating_text": c.text, "finished": c.finished}
                for p, c in zip(pairs, completions)]
    else:
        chats = [curation_messages(i, r, logprob_template(cfg.template), system) for i, r in shown]
        probs = engine.choice_probs(chats, LOGPROB_PREFIX, [" " + s for s in SCORES])
        rows = []
        for p, ps in zip(pairs, probs):
            mass = sum(ps)
            scored = mass > 0 and mass >= cfg.min_choice_mass
            expected = sum((i + 1) * q for i, q in enumerate(ps)) / mass if scored else None
            rows.append({"segment_id": p["segment_id"], "score": round(expected, 4) if expected is not None else None,
                         "probs": [round(q, 6) for q in ps], "choice_mass": round(mass, 6)})
    for row, found in zip(rows, flags):
        if found:
            row["flags"] = dict(sorted(found.items()))
    return rows


def logprob_template(template: str) -> str:
    """The logprob-mode prompt matching a rubric prompt: ``curation_rubric_v2`` ->
    ``curation_rubric_logprob_v2`` (a logprob prompt is used as it is)."""
    if template.startswith("curation_rubric_logprob"):
        return template
    if template.startswith("curation_rubric_"):
        return "curation_rubric_logprob_" + template[len("curation_rubric_"):]
    return "curation_rubric_logprob_v1"


def planted_counts(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How many rated pairs carried planted rating text, and how much of each kind."""
    kinds: dict[str, int] = {}
    flagged = 0
    for row in scores:
        if row.get("flags"):
            flagged += 1
            add_counts(kinds, row["flags"])
    return {"flagged": flagged, "kinds": dict(sorted(kinds.items()))}


def score_histogram(scores: Sequence[float | None]) -> dict[str, int]:
    """Counts per rounded score 1-5, plus ``unscored``."""
    hist = Counter("unscored" if s is None else str(min(5, max(1, int(s + 0.5)))) for s in scores)
    return {key: hist.get(key, 0) for key in (*SCORES, "unscored")}


def select_pairs(
    candidates: Sequence[dict[str, Any]], scores: Sequence[dict[str, Any]], cfg: SelectSection
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs scoring at least ``k`` (best first if ``max_pairs`` caps them), and counts.

    ``k == "all"`` keeps every candidate, unscored ones included (no curation); each kept pair
    still carries its score (None when unscored)."""
    by_id = {s["segment_id"]: s["score"] for s in scores}
    flagged_ids = {s["segment_id"] for s in scores if s.get("flags")} if cfg.drop_flagged else set()
    missing = [c["segment_id"] for c in candidates if c["segment_id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} candidates have no score, e.g. {missing[:3]}")
    eligible = [c for c in candidates if c["segment_id"] not in flagged_ids]
    if cfg.k == "all":
        kept = [dict(c, score=by_id[c["segment_id"]]) for c in eligible]
    else:
        kept = [dict(c, score=by_id[c["segment_id"]]) for c in eligible
                if by_id[c["segment_id"]] is not None and by_id[c["segment_id"]] >= cfg.k]
    capped = 0
    if cfg.max_pairs is not None and len(kept) > cfg.max_pairs:
        order = sorted(range(len(kept)), key=lambda i: (-kept[i]["score"], i))[: cfg.max_pairs]
        capped = len(kept) - cfg.max_pairs
        kept = [kept[i] for i in sorted(order)]
    unscored = sum(1 for c in eligible if by_id[c["segment_id"]] is None)
    stats = {
        "candidates": len(candidates),
        "selected": len(kept),
        "below_k": 0 if cfg.k == "all" else len(eligible) - unscored - len(kept) - capped,
        "unscored": unscored,
        "flagged": len(candidates) - len(eligible),
        "capped": capped,
        "k": cfg.k,
        "keep_rate": round(len(kept) / len(candidates), 4) if candidates else 0.0,
    }
    return kept, stats
