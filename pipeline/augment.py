"""Self-augmentation: the backward model writes an instruction for every corpus segment."""

from __future__ import annotations

import re
from typing import Any, Sequence

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


def generate_instructions(
    engine: Engine, segments: Sequence[dict[str, Any]], cfg: AugmentSection, template: str, seed: int
) -> list[dict[str, Any]]:
    """One candidate row per segment: the instruction, and why it was rejected if it was."""
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
    )
    chats = [backward_messages(seg["text"], template) for seg in segments]
    completions = engine.generate(chats, params)
    prompt = render(template)
    rows = []
    for seg, comp in zip(segments, completions):
        reason = degenerate_reason(comp.text, seg["text"], comp.finished, cfg, prompt)
        rows.append(
            {
                "segment_id": seg["segment_id"],
                "instruction": comp.text,
                "response": seg["text"],
                "rejected": reason,
            }
        )
    return rows
