"""The one interface every stage generates through: chats in, texts or choice probabilities out.

Stages never call a model's ``generate`` themselves. :class:`TransformersEngine` is the
in-process engine for CPUs and tests; other engines (vLLM, a server) plug in behind the same two
methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline import hardware
from pipeline.decoding import decode, prefill

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    min_new_tokens: int = 0
    """EOS cannot be drawn before this many new tokens (benchmarks use it to fix the work)."""


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool
    """False when generation stopped at ``max_new_tokens`` rather than at EOS or a stop string."""
    new_tokens: int


class Engine(Protocol):
    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]: ...

    def choice_probs(self, chats: Sequence[Chat], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """For each chat with the assistant turn begun by ``prefix``: the probability of each
        choice being what comes next (one forward pass, no decoding)."""
        ...


class PromptSide:
    """What every engine does on this side of the model, with ``self.tokenizer``: render a chat
    with its template, tokenize, and name the stop strings. Engines share it, so they see the
    same prompt ids and stop at the same strings."""

    tokenizer: PreTrainedTokenizerBase

    def render(self, chat: Chat, prefix: str = "") -> str:
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text + prefix

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _stops(self, params: SamplingParams) -> tuple[str, ...]:
        """The caller's stop strings, plus the chat template's end of turn when that is plain
        text to this tokenizer (:func:`turn_end_stops`)."""
        return tuple(params.stop) + tuple(s for s in turn_end_stops(self.tokenizer) if s not in params.stop)


@dataclass
class TransformersEngine(PromptSide):
    """Generation and scoring on a transformers model, in the model's own dtype and device (cast
    the model before handing it over: :func:`harness.stages.make_engine` casts to bf16 where the
    hardware has it, once, rather than autocasting every step)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 8
    """The most sequences in one batch."""
    kv_cache_gib: float | str | None = None
    """Memory for one batch's KV cache: a batch holds fewer than ``batch_size`` sequences when
    its padded width (longest prompt plus the new-token budget) times its size would need more.
    None: no limit beyond ``batch_size``; ``"auto"``: half the memory free on the model's device
    when the engine is built (:func:`pipeline.hardware.kv_cache_budget_gib`)."""
    min_shared_prefix: int = 32
    """A batch whose prompts share at least this many leading tokens computes them once (the
    curation rubric, the judge's template); 0 turns this off."""
    stats: dict[str, float] = field(
        default_factory=lambda: {"prompt_tokens": 0, "new_tokens": 0, "prefix_tokens_reused": 0})
    """``prompt_tokens``: prompt tokens of every row; ``prefix_tokens_reused``: those of them not
    computed because a shared prefix was computed once per batch instead."""

    def __post_init__(self) -> None:
        self.model.eval()
        self.kv_cache_gib = hardware.kv_cache_budget_gib(self.kv_cache_gib, self.model.device)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes in this model (keys and values, every layer)."""
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        itemsize = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize

    def max_batch_tokens(self) -> int | None:
        """Padded tokens (sequences x width) one batch may hold, from ``kv_cache_gib``."""
        if self.kv_cache_gib is None:
            return None
        return max(1, int(self.kv_cache_gib * 2**30 / self.kv_bytes_per_token()))

    def _batches(self, ids: list[list[int]], new_tokens: int = 0) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first), to waste little
        padding: at most ``batch_size`` each, and no more padded tokens (width including the
        ``new_tokens`` to come) than the KV-cache budget allows. A single sequence over the
        budget still gets a batch of its own."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        budget = self.max_batch_tokens()
        batches: list[list[int]] = []
        for i in order:
            if batches:
                current = batches[-1]
                width = len(ids[current[0]]) + new_tokens  # the first is the longest
                fits = budget is None or (len(current) + 1) * width <= budget
                if len(current) < self.batch_size and fits:
                    current.append(i)
                    continue
            batches.append([i])
        return batches

    def _pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.model.device)
        return input_ids, mask

    def _layout(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A batch as tensors: ``(input_ids, mask, shared)``. When the sequences share a prefix of
        at least ``min_shared_prefix`` tokens, it comes first, once per row, and the rest of each
        sequence is left-padded after it (prefix, padding, rest), so the prefix can be computed
        once for the whole batch; otherwise plain left padding and ``shared`` = 0."""
        shared = common_prefix_length(seqs) if self.min_shared_prefix > 0 else 0
        if shared == 0 or shared < self.min_shared_prefix:
            return (*self._pad_left(seqs), 0)
        rest_ids, rest_mask = self._pad_left([s[shared:] for s in seqs])
        head = torch.tensor(seqs[0][:shared], device=self.model.device).expand(len(seqs), -1)
        return (torch.cat([head, rest_ids], dim=-1), torch.cat([torch.ones_like(head), rest_mask], dim=-1), shared)

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        ids = self._encode([self.render(c) for c in chats])
        return [self._completion(tokens, params) for tokens in self.generate_tokens(ids, params)]

    @torch.inference_mode()
    def generate_tokens(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Each prompt's new token ids (prompts given as token ids, already rendered): ending with
        the EOS token where one was drawn, or with the token that completed a stop string."""
        ids = [list(p) for p in prompts]
        if any(not p for p in ids):
            raise ValueError("every prompt needs at least one token")
        out: list[list[int] | None] = [None] * len(ids)
        generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        stopped = self._stop_check(self._stops(params))
        eos = set(self._eos_ids())
        for batch in self._batches(ids, params.max_new_tokens):
            input_ids, mask, shared = self._layout([ids[i] for i in batch])
            new = decode(
                self.model, input_ids, mask, max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens, temperature=params.temperature, top_p=params.top_p,
                eos_ids=sorted(eos), pad_id=self.tokenizer.pad_token_id, stopped=stopped, generator=generator,
                shared=shared,
            )
            self._count(mask, shared)
            for row, i in enumerate(batch):
                out[i] = new[row]
                self.stats["new_tokens"] += len(new[row]) - (1 if new[row] and new[row][-1] in eos else 0)
        return [tokens for tokens in out if tokens is not None]

    def _count(self, mask: torch.Tensor, shared: int) -> None:
        self.stats["prompt_tokens"] += int(mask.sum())
        if shared:
            self.stats["prefix_tokens_reused"] += shared * (mask.shape[0] - 1)

    def _eos_ids(self) -> list[int]:
        ids = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        return sorted(i for i in ids if i is not None)

    def _stop_check(self, stops: Sequence[str]):
        """A test of a row's tokens so far: does the text they end with contain a stop string?
        Only the last tokens are decoded (every token is at least one character, so a stop
        string of c characters lies within the last c + 1 tokens)."""
        if not stops:
            return None
        width = max(len(s) for s in stops) + 1

        def stopped(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-width:], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return stopped

    def _completion(self, tokens: list[int], params: SamplingParams) -> Completion:
        return completion_from_tokens(self.tokenizer, tokens, self._eos_ids(), self._stops(params))

    def _split_choices(self, text: str, prefix: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        return split_choices(self.tokenizer, text, prefix, choices)

    @torch.inference_mode()
    def choice_probs(self, chats: Sequence[Chat], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        texts = [self.render(c) for c in chats]
        split = [self._split_choices(text, prefix, choices) for text in texts]
        feeds = [f for f, _ in split]
        heads = [h for _, h in split]
        out: list[list[float]] = [[] for _ in chats]
        for batch in self._batches(feeds):
            input_ids, mask, shared = self._layout([feeds[i] for i in batch])
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            _, logits = prefill(self.model, input_ids, mask, positions, 0, shared)
            probs = torch.softmax(logits.float(), dim=-1)
            self._count(mask, shared)
            for row, i in enumerate(batch):
                out[i] = [float(probs[row, t]) for t in heads[i]]
        return out


def completion_from_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], eos_ids: Sequence[int],
                           stops: Sequence[str]) -> Completion:
    """A row's new tokens as a :class:`Completion`: cut at the first EOS, decoded without special
    tokens, cut at the first stop string; finished when either was found. Every engine reads its
    tokens this way, so engines that draw the same tokens return the same texts."""
    eos = set(eos_ids)
    cut = len(tokens)
    finished = False
    for j, tok in enumerate(tokens):
        if tok in eos:
            cut, finished = j, True
            break
    text = tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True)
    for stop in stops:
        pos = text.find(stop)
        if pos >= 0:
            text, finished = text[:pos], True
    return Completion(text=text.strip(), finished=finished, new_tokens=cut)


def split_choices(tokenizer: PreTrainedTokenizerBase, text: str, prefix: str,
                  choices: Sequence[str]) -> tuple[list[int], list[int]]:
    """Where the choices first differ as tokens after ``text + prefix``: the shared ids to feed,
    and one token id per choice. Works whatever the tokenizer does with spaces and digits."""
    seqs = [tokenizer(text + prefix + c, add_special_tokens=False)["input_ids"] for c in choices]
    common = 0
    while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
        common += 1
    heads = [s[common] if len(s) > common else -1 for s in seqs]
    if -1 in heads or len(set(heads)) != len(heads):
        raise ValueError(f"choices {list(choices)} do not start with distinct tokens after {prefix!r}")
    return seqs[0][:common], heads


def turn_end_stops(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """``("<|im_end|>",)`` when the chat template ends turns with ChatML's marker but this
    tokenizer has no such token (a base model given the ChatML fallback template learns to write
    the marker as text, and would otherwise never stop); ``()`` when the marker is a token of its
    own (then it is the EOS, or the model's own business) or the template does not use it."""
    marker = "<|im_end|>"
    if marker not in (tokenizer.chat_template or ""):
        return ()
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return () if len(ids) == 1 else (marker,)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Leading tokens every sequence shares, leaving each at least one token of its own (the
    last token's logits are what a prefill is for)."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
