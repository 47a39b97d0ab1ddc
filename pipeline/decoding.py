"""The engine's decoding loop: one batch of left-padded prompts in, each row's new tokens out.

Why not ``model.generate``: on a CPU, three of its costs dominate batched decoding of a small
model, and none of them is the model. Profiled on SmolLM2-135M, 64 rows (2-core AVX512-BF16):

* top-p sampling sorts the whole vocabulary every step (``aten::sort`` on 64 x 49152 logits,
  92 ms/step), and multinomial draws an exponential for every vocabulary entry (61 ms/step):
  together as long as the forward pass itself (150 ms/step). :func:`pick_tokens` finds the
  nucleus among the top 64 candidates (exact: it widens the candidate set for any row whose top
  candidates do not reach ``top_p``) and samples among those only.
* rows that finished keep being computed until the last row of the batch finishes;
  :func:`decode` drops them from the batch (and from the KV cache) as they finish.
* ``min_new_tokens`` rewrites the full logits with ``torch.where`` every step; here it is two
  index assignments on the EOS columns.

Decoding is fully determined by :class:`~pipeline.engine.SamplingParams`: the model's own
``generation_config`` (repetition penalties, default temperatures) is not applied.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

CANDIDATES = 64
"""Top-p candidates looked at first; rows whose top 64 hold less than ``top_p`` of the
probability mass are done again over the full vocabulary."""
PREFILL_ROWS = 32
"""Most rows in one prefill group."""
PREFILL_SLACK = 0.8
"""A prefill group takes rows down to this share of its longest prompt's length."""
SHRINK_SHARE = 0.125
"""Finished rows are dropped from the batch once they are this share of it (or the batch is
small): dropping copies the KV cache, so it is not done for every single row."""


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes into buffers sized for the whole generation.

    transformers' ``DynamicLayer`` concatenates every step, copying the layer's whole cache each
    time (O(length) per step, a noticeable share of a CPU decode). This
    one allocates prompt width plus ``extra`` positions once and hands out views of the filled
    part; it grows (doubling) only if more positions arrive than were announced.
    """

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _ensure(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self.key_buffer is not None and needed <= self.key_buffer.shape[-2]:
            return
        capacity = needed + self.extra if self.key_buffer is None else max(needed, 2 * self.key_buffer.shape[-2])
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.length:
            keys[..., : self.length, :] = self.keys
            values[..., : self.length, :] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._ensure(key_states, value_states, end)
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def place(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, width: int, batch: int,
              shared: int = 0) -> None:
        """Write a prefill group's keys and values into ``rows`` of a ``batch``-row cache: the
        first ``shared`` positions (a prefix common to every row) at the start, the rest
        right-aligned at ``width``. The buffers start zeroed, so the padding between them, which
        the mask hides, never holds NaNs (zero attention weight times NaN would still be NaN)."""
        if self.key_buffer is None:
            self.lazy_initialization(keys, values)
            capacity = width + self.extra
            self.key_buffer = keys.new_zeros((batch, keys.shape[1], capacity, keys.shape[-1]))
            self.value_buffer = values.new_zeros((batch, values.shape[1], capacity, values.shape[-1]))
        tail = keys.shape[-2] - shared
        for buffer, states in ((self.key_buffer, keys), (self.value_buffer, values)):
            if shared:
                buffer[rows, :, :shared, :] = states[:, :, :shared, :]
            buffer[rows, :, width - tail : width, :] = states[:, :, shared:, :]
        self.length = width
        self.keys = self.key_buffer[..., :width, :]
        self.values = self.value_buffer[..., :width, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self.keys = self.key_buffer[..., : self.length, :]
            self.values = self.value_buffer[..., : self.length, :]


def new_cache(model, extra: int) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are :class:`PreallocatedLayer`
    (sliding-window and other special layers keep transformers' own)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(extra) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _nucleus_sample(probs: torch.Tensor, order: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """Sample from ``probs`` (rows of candidate probabilities, sorted descending, summing to at
    most 1) restricted to each row's nucleus: the shortest prefix holding ``top_p`` of the mass
    (always at least one candidate). ``order`` maps candidate positions to token ids."""
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each candidate
    kept = torch.where(before < top_p, probs, torch.zeros_like(probs))
    kept[:, 0] = probs[:, 0]
    choice = torch.multinomial(kept, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """The next token of every row: argmax when ``temperature`` is 0, else a draw from the
    softmax at ``temperature`` restricted to the top-p nucleus (``top_p`` = 1: no restriction)."""
    if temperature <= 0:
        return logits.float().argmax(-1)  # torch's CPU argmax over bf16 is slower than cast + argmax
    scaled = logits.float() / temperature
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(-1)
    total = torch.logsumexp(scaled, -1, keepdim=True)
    k = min(CANDIDATES, scaled.shape[-1])
    values, order = scaled.topk(k, dim=-1)
    probs = torch.exp(values - total)
    out = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    covered = probs.sum(-1) >= top_p
    if covered.any():
        out[covered] = _nucleus_sample(probs[covered], order[covered], top_p, generator)
    if not covered.all():
        rest = ~covered
        values, order = scaled[rest].sort(-1, descending=True)
        out[rest] = _nucleus_sample(torch.exp(values - total[rest]), order, top_p, generator)
    return out


def length_groups(lengths: Sequence[int], max_rows: int = PREFILL_ROWS, slack: float = PREFILL_SLACK) -> list[list[int]]:
    """Rows grouped for prefill: longest first; a group closes when it has ``max_rows`` rows or
    the next row is shorter than ``slack`` times its longest (so little of it is padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < max_rows and lengths[i] >= slack * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, extra: int,
            shared: int = 0):
    """Run the prompts through the model, filling a cache with room for ``extra`` more tokens;
    returns the cache and each row's next-token logits.

    A batch of left-padded prompts of very different lengths is mostly padding, and a prefill
    computes every padded position in full (over half of a batch of the demo's seed prompts is
    padding). So rows are prefilled in groups of similar length, each trimmed to its own longest
    prompt, and their keys and values are written right-aligned into one zeroed, preallocated
    cache whose left padding the attention mask hides, as if the batch had been run whole.

    ``shared``: the first ``shared`` columns are one prefix common to every row (the layout is
    prefix, padding, prompt rest; see ``TransformersEngine``). It is computed once, for one row,
    and every group starts from its keys and values: the curation rubric, the judge's template
    and the augmentation directive are such prefixes.
    """
    cache = new_cache(model, extra)
    width = input_ids.shape[1]
    preallocated = all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    lengths = (mask[:, shared:].sum(-1)).tolist()
    groups = length_groups(lengths)
    if not preallocated or (len(groups) == 1 and not shared):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1, :]
    prefix = None
    if shared:
        prefix = DynamicCache(config=model.config)
        model(input_ids=input_ids[:1, :shared], attention_mask=mask[:1, :shared], position_ids=positions[:1, :shared],
              cache=prefix, use_cache=True, logits_to_keep=1)
    logits = None
    for group in groups:
        rows = torch.tensor(group, dtype=torch.long, device=input_ids.device)
        start = width - max(lengths[i] for i in group)
        part = DynamicCache(config=model.config)
        group_mask = mask[rows, start:]
        if prefix is not None:
            for index, layer in enumerate(prefix.layers):
                part.update(layer.keys.expand(len(group), -1, -1, -1), layer.values.expand(len(group), -1, -1, -1), index)
            group_mask = torch.cat([mask[rows, :shared], group_mask], dim=-1)
        out = model(input_ids=input_ids[rows, start:], attention_mask=group_mask, position_ids=positions[rows, start:],
                    cache=part, use_cache=True, logits_to_keep=1)
        if logits is None:
            logits = out.logits.new_empty((input_ids.shape[0], out.logits.shape[-1]))
        logits[rows] = out.logits[:, -1, :]
        for layer, filled in zip(cache.layers, part.layers):
            layer.place(rows, filled.keys, filled.values, width, input_ids.shape[0], shared)
    return cache, logits


def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int],
    pad_id: int,
    stopped: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    shared: int = 0,
) -> list[list[int]]:
    """Decode a batch of left-padded prompts with a KV cache.

    Returns each row's new tokens, ending with the EOS token where one was drawn (or with the
    token after which ``stopped`` said yes), else ``max_new_tokens`` long. EOS cannot be drawn
    before ``min_new_tokens`` tokens. ``shared``: see :func:`prefill`.
    """
    n = input_ids.shape[0]
    eos = sorted(set(eos_ids))
    eos_index = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return tokens
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, logits = prefill(model, input_ids, mask, positions, max_new_tokens, shared)
    next_pos = positions[:, -1:] + 1
    rows = list(range(n))  # the original row of each batch row
    done = [False] * n
    for step in range(max_new_tokens):
        if step < min_new_tokens and len(eos):
            logits[:, eos_index] = float("-inf")
        picked = pick_tokens(logits, temperature, top_p, generator)
        for b, tok in enumerate(picked.tolist()):
            r = rows[b]
            if done[r]:
                continue
            tokens[r].append(tok)
            if tok in eos or (stopped is not None and stopped(tokens[r])):
                done[r] = True
        if step == max_new_tokens - 1 or all(done[r] for r in rows):
            break
        finished = [b for b, r in enumerate(rows) if done[r]]
        if finished and (len(finished) >= SHRINK_SHARE * len(rows) or len(rows) <= 8):
            keep = [b for b, r in enumerate(rows) if not done[r]]
            index = torch.tensor(keep, dtype=torch.long, device=input_ids.device)
            cache.batch_select_indices(index)
            mask, next_pos, picked = mask[index], next_pos[index], picked[index]
            rows = [rows[b] for b in keep]
        # Finished rows still in the batch are fed padding; their outputs are ignored.
        feed = picked.clone()
        for b, r in enumerate(rows):
            if done[r]:
                feed[b] = pad_id
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        logits = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos, cache=cache,
                       use_cache=True).logits[:, -1, :]
        next_pos = next_pos + 1
    return tokens
