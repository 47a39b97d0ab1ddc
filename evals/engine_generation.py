"""lm-eval's ``generate_until`` requests answered by the project's engine.

lm-eval's HF model generates with ``model.generate`` on batches padded to their longest prompt,
and a batch keeps decoding until its last row has stopped: finished rows go on being decoded
with the rest. The engine (:class:`pipeline.engine.TransformersEngine`) prefills rows of similar
length together, drops rows as they stop and stops each row at its own stop string, on the same
model object lm-eval loaded (fp32, adapter and all), so the held-out scores keep their dtype.
docs/measurements.md compares the two paths' answers and times on the demo.

What is kept from lm-eval's own path: the prompts are encoded by lm-eval's
``tok_batch_encode`` (its special-token rules and left truncation to ``max_length -
max_gen_toks``), the continuation is decoded by its ``tok_decode`` and cut by its
``postprocess_generated_text`` at the first stop sequence (EOS included), and every answer goes
through its cache hook. The engine decodes greedily or samples with temperature and top-p,
and nothing else; a request group that would be decoded differently by lm-eval's own
``generate_until`` is answered by it instead: one asking for other settings (``top_k``,
penalties, beams), one whose model's ``generation_config`` sets a logits processor the engine
lacks (a repetition penalty, banned n-grams, ...), and every sampled group unless that config
turns top-k off (``top_k: 0``), since transformers samples from the top 50 tokens by default.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8
"""Rows per batch when lm-eval's batch size is not a number ("auto")."""
SUPPORTED_KWARGS = {"do_sample", "temperature", "top_p"}
"""Generation settings the engine honours; any other key sends its group to lm-eval's path."""
NEUTRAL_CONFIG = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "num_beams": 1,
    "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
}
"""``generation_config`` fields that change even a greedy decode, with the values (or None,
unset) under which they do nothing."""
NEUTRAL_SAMPLING_CONFIG = {"typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
"""Fields that change sampling only, likewise."""
DEFAULT_TOP_K = 50
"""transformers' top-k when sampling and the generation config leaves it unset."""


def config_differences(generation_config, sample: bool) -> list[str]:
    """``generation_config`` settings under which transformers' ``generate`` would decode
    differently from the engine (greedy, or sampled when ``sample``)."""
    fields = dict(NEUTRAL_CONFIG, **(NEUTRAL_SAMPLING_CONFIG if sample else {}))
    out = [f"{name}={value!r}" for name, neutral in fields.items()
           if (value := getattr(generation_config, name, None)) is not None and value != neutral]
    if sample:
        top_k = getattr(generation_config, "top_k", None)
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        if top_k:
            out.append(f"top_k={top_k!r}")
    return out


def _group_key(gen_kwargs: dict[str, Any]) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def engine_generate_until(lm, requests: Sequence[Any], fallback, seed: int = 0) -> list[str]:
    """Answers for ``requests`` (lm-eval ``Instance`` objects whose ``args`` are ``(context,
    gen_kwargs)``), in their order. ``lm`` is lm-eval's HF model; ``fallback(requests)`` answers
    a group the engine cannot (lm-eval's own ``generate_until``)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    from pipeline.engine import SamplingParams, TransformersEngine

    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(_group_key(request.args[1]), []).append(index)
    answers: list[str | None] = [None] * len(requests)
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    padding_side = lm.tokenizer.padding_side
    batch_size = lm.engine_batch_size or lm.batch_size
    batch_size = batch_size if isinstance(batch_size, int) else DEFAULT_BATCH
    engine = TransformersEngine(lm.model, lm.tokenizer, batch_size=batch_size, kv_cache_gib=lm.engine_kv_cache_gib)
    lm.tokenizer.padding_side = padding_side  # the engine pads by itself; lm-eval keeps its setting
    eos_ids = set(engine._eos_ids())
    think_end = getattr(lm, "think_end_token", None)
    for indices in groups.values():
        gen_kwargs = requests[indices[0]].args[1]
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
        unsupported = sorted(set(kwargs) - SUPPORTED_KWARGS)
        unsupported += config_differences(getattr(lm.model, "generation_config", None), sample)
        if unsupported:
            log.info("held-out generation: %d requests with %s go through lm-eval's generate", len(indices), unsupported)
            for i, answer in zip(indices, fallback([requests[i] for i in indices])):
                answers[i] = answer
            continue
        params = SamplingParams(
            max_new_tokens=max_gen_toks,
            temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
            stop=tuple(s for s in until if s),
            seed=seed,
        )
        contexts = [requests[i].args[0] for i in indices]
        input_ids, mask = lm.tok_batch_encode(contexts, left_truncate_len=lm.max_length - max_gen_toks,
                                              truncation=lm.truncation)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        for i, context, tokens in zip(indices, contexts, engine.generate_tokens(prompts, params)):
            if tokens and tokens[-1] in eos_ids:
                tokens = tokens[:-1]
            if isinstance(think_end, int) and think_end in tokens:
                tokens = tokens[len(tokens) - tokens[::-1].index(think_end):]
            text = lm.tok_decode(tokens)
            if isinstance(think_end, int):
                text = text.lstrip()
            text = postprocess_generated_text(generation=text, stop=until,
                                              think_end_token=think_end if isinstance(think_end, str) else None)
            answers[i] = text
            lm.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise RuntimeError(f"held-out generation left {len(missing)} of {len(requests)} requests unanswered")
    return answers
