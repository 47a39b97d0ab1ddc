"""Self-augmentation: the backward model writes an instruction for every corpus segment.

The new-token budget of an instruction comes from the seed (``augment.max_new_tokens: auto``):
the backward model learnt to write instructions like the seed's, so a high quantile of their
lengths, in its own tokens, times a margin is enough for any instruction it means to end, on any
corpus. What runs past that budget is not a long instruction cut short but one that does not end.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from pipeline.settings import AugmentSection
from pipeline.corpus import words
from pipeline.engine import Engine, SamplingParams
from pipeline.prompts import backward_messages, render

# Chat-format debris; copies of the prompt's own wording are caught by n-gram overlap instead.
_CHAT_DEBRIS = re.compile(r"<\|im_(start|end)\|>|</?s>|^\s*(system|user|assistant)\s*:", re.IGNORECASE | re.MULTILINE)


def _echo_overlap(instruction: str, segment: str, n: int = 4) -> float:
    """Share of the instruction's word n-grams that are copied from ``segment``."""
    inst = words(instruction)
    if len(inst) < n:
        return 1.0 if " ".join(inst) and " ".join(inst) in " ".join(words(segment)) else 0.0
    grams = {tuple(inst[i : i + n]) for i in range(len(inst) - n + 1)}
    seg = words(segment)
    seg_grams = {tuple(seg[i : i + n]) for i in range(len(seg) - n + 1)}
    return len(grams & seg_grams) / len(grams)


def instruction_token_lengths(count_tokens: Callable[[str], int], instructions: Sequence[str]) -> list[int]:
    """New tokens each instruction takes from the backward model: its own tokens (``count_tokens``,
    the backward model's tokenizer without special tokens) plus the one that ends the turn."""
    return [count_tokens(text) + 1 for text in instructions]


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile: the smallest value with at least a share ``q`` of the values
    at or below it (no interpolation, so it is always one of the values)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def length_summary(lengths: Sequence[int]) -> dict[str, Any]:
    """Count, min, p50, p90, p95, max and mean of token lengths (all None when there are none)."""
    if not lengths:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p95": None, "max": None, "mean": None}
    return {"n": len(lengths), "min": min(lengths), "p50": quantile(lengths, 0.5), "p90": quantile(lengths, 0.9),
            "p95": quantile(lengths, 0.95), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 2)}


def token_budget(seed_lengths: Sequence[int], cfg: AugmentSection) -> tuple[int, dict[str, Any]]:
    """The new-token budget of one instruction, and how it was set (for the stage's stats).

    ``max_new_tokens: auto``: the ``budget_quantile`` quantile of ``seed_lengths`` (the seed
    instructions in the backward model's tokens, end of turn included) times ``budget_margin``,
    rounded up. A fixed budget is taken as it is; the seed's lengths are recorded either way, with
    the share of seed instructions that a fixed budget would have cut."""
    summary = length_summary(seed_lengths)
    info: dict[str, Any] = {"seed_instruction_tokens": summary}
    if cfg.max_new_tokens == "auto":
        if not seed_lengths:
            raise ValueError("augment.max_new_tokens is 'auto' but there are no seed instructions to measure")
        q = quantile(seed_lengths, cfg.budget_quantile)
        budget = max(1, math.ceil(q * cfg.budget_margin))
        info.update(source="auto", quantile=cfg.budget_quantile, quantile_tokens=q, margin=cfg.budget_margin)
    else:
        budget = cfg.max_new_tokens
        info["source"] = "config"
    over = sum(n > budget for n in seed_lengths)
    info.update(max_new_tokens=budget, seed_over_budget=over)
    return budget, info


def degenerate_reason(
    instruction: str, segment: str, finished: bool, cfg: AugmentSection, prompt: str = ""
) -> str | None:
    """Why a generated instruction is unusable, or None if it is fine. ``prompt`` is the fixed
    prompt text (the template); any 5 consecutive words of it in the instruction are a leak."""
    text = instruction.strip()
    if not text:
        return "empty"
    if not finished and cfg.drop_unfinished:
        return "unfinished"
    if len(text) < cfg.min_instruction_chars:
        return "too_short"
    if _CHAT_DEBRIS.search(text) or (prompt and _echo_overlap(text, prompt, n=5) > 0):
        return "prompt_leak"
    if _echo_overlap(text, segment) >= cfg.max_echo_overlap:
        return "echo"
    tokens = words(text)
    if len(tokens) >= 8 and len(set(tokens)) / len(tokens) < 0.3:
        return "repetitive"
    return None


_SENTENCE_END = re.compile(r"[.?!][\"'\u201d\u2019)\]]*$")
_AUGMENT_FIELDS = ("rejected", "new_tokens", "salvaged_from")


def salvage(text: str) -> str | None:
    """The first paragraph of an instruction that ran past its budget, when a blank line closes it
    after a finished sentence (what the model wrote before it went on to something else); None
    when there is no such paragraph. Only a paragraph break counts: cutting at the first sentence
    of a text that never breaks would keep the opening of a summary or of a rambling instruction."""
    head, sep, _ = text.strip().partition("\n\n")
    head = head.strip()
    if not sep or not head or not _SENTENCE_END.search(head):
        return None
    return head


def candidate(row: dict[str, Any]) -> dict[str, Any]:
    """A kept row as ``candidates.jsonl`` holds it: without augmentation's bookkeeping."""
    return {k: v for k, v in row.items() if k not in _AUGMENT_FIELDS}


def generate_instructions(
    engine: Engine, segments: Sequence[dict[str, Any]], cfg: AugmentSection, template: str, seed: int
) -> list[dict[str, Any]]:
    """One row per segment: the instruction, why it was rejected if it was, the new tokens it took
    (the end of turn included, as in :func:`instruction_token_lengths`) and, for an unfinished
    instruction saved by ``salvage_unfinished``, the text it was cut from (``salvaged_from``).

    ``cfg.max_new_tokens`` must be a number here (``auto`` is resolved by :func:`token_budget`)."""
    if not isinstance(cfg.max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be resolved to a number first (got {cfg.max_new_tokens!r})")
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
    )
    chats = [backward_messages(seg["text"], template) for seg in segments]
    completions = engine.generate(chats, params)
    prompt = render(template)
    rows = []
    for seg, comp in zip(segments, completions):
        reason = degenerate_reason(comp.text, seg["text"], comp.finished, cfg, prompt)
        row = {"segment_id": seg["segment_id"], "instruction": comp.text, "response": seg["text"]}
        if reason == "unfinished" and cfg.salvage_unfinished:
            head = salvage(comp.text)
            if head is not None and degenerate_reason(head, seg["text"], True, cfg, prompt) is None:
                row.update(instruction=head, salvaged_from=comp.text)
                reason = None
        row.update(rejected=reason, new_tokens=comp.new_tokens + (1 if comp.finished else 0))
        rows.append(row)
    return rows
