"""The evaluated model's answers to AlpacaEval instructions, through the project's engine, as
AlpacaEval records (``instruction``, ``output``, ``generator``, ``dataset``)."""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.engine import Engine, SamplingParams
from pipeline.prompts import forward_messages

def generate_answers(
    engine: Engine,
    instructions: Sequence[dict[str, Any]],
    *,
    generator: str,
    system_prompt: str | None,
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.0,
) -> list[dict[str, Any]]:
    """The evaluated model's answers, as AlpacaEval records.

    Args:
        engine: the project's generation engine holding the evaluated model.
        instructions: items with ``instruction`` (and ``dataset``), e.g. ``InstructionSet.instructions``.
        generator: the model's name in the records (AlpacaEval's ``generator``).
        system_prompt: the system turn, e.g. the fine-tuning tag the model was trained with; None
            for no system turn.
        max_new_tokens: the answer length limit.
        seed: sampling seed (greedy decoding, the default, does not use it).
        temperature: 0 for greedy decoding.

    Returns:
        ``{"instruction", "output", "generator", "dataset"}`` per instruction, in order.
    """
    chats = [forward_messages(r["instruction"], system_prompt) for r in instructions]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    completions = engine.generate(chats, params)
    return [
        {"instruction": r["instruction"], "output": c.text, "generator": generator, "dataset": r.get("dataset", "")}
        for r, c in zip(instructions, completions)
    ]
