"""The one interface every stage generates through: chats in, texts or choice probabilities out.

Stages never call a model's ``generate`` themselves. :class:`TransformersEngine` is the
in-process engine for CPUs and tests; other engines (vLLM, a server) plug in behind the same two
methods.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


@dataclass
class TransformersEngine:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 8
    autocast_bf16: bool = False
    stats: dict[str, float] = field(default_factory=lambda: {"prompt_tokens": 0, "new_tokens": 0})

    def __post_init__(self) -> None:
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)

    def render(self, chat: Chat, prefix: str = "") -> str:
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text + prefix

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _batches(self, ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first), to waste little padding."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.model.device)
        return input_ids, mask

    @torch.inference_mode()
    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        ids = self._encode([self.render(c) for c in chats])
        out: list[Completion | None] = [None] * len(chats)
        torch.manual_seed(params.seed)
        for batch in self._batches(ids):
            input_ids, mask = self._pad_left([ids[i] for i in batch])
            kwargs = dict(
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                do_sample=params.temperature > 0,
            )
            if params.temperature > 0:
                kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if params.stop:
                kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
            with self._autocast():
                gen = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            new = gen[:, input_ids.shape[1] :]
            self.stats["prompt_tokens"] += int(mask.sum())
            for row, i in enumerate(batch):
                out[i] = self._completion(new[row].tolist(), params)
        return [c for c in out if c is not None]

    def _completion(self, tokens: list[int], params: SamplingParams) -> Completion:
        eos = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        pad = self.tokenizer.pad_token_id
        cut = len(tokens)
        finished = False
        for j, tok in enumerate(tokens):
            if tok in eos:
                cut, finished = j, True
                break
        while cut > 0 and tokens[cut - 1] == pad and pad not in eos:
            cut -= 1
        self.stats["new_tokens"] += cut
        text = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
        for stop in params.stop:
            pos = text.find(stop)
            if pos >= 0:
                text, finished = text[:pos], True
        return Completion(text=text.strip(), finished=finished, new_tokens=cut)

    def _split_choices(self, text: str, prefix: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """Where the choices first differ as tokens: the shared ids to feed, and one token id per
        choice. Works whatever the tokenizer does with spaces and digits."""
        seqs = self._encode([text + prefix + c for c in choices])
        common = 0
        while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
            common += 1
        heads = [s[common] if len(s) > common else -1 for s in seqs]
        if -1 in heads or len(set(heads)) != len(heads):
            raise ValueError(f"choices {list(choices)} do not start with distinct tokens after {prefix!r}")
        return seqs[0][:common], heads

    @torch.inference_mode()
    def choice_probs(self, chats: Sequence[Chat], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        texts = [self.render(c) for c in chats]
        split = [self._split_choices(text, prefix, choices) for text in texts]
        feeds = [f for f, _ in split]
        heads = [h for _, h in split]
        out: list[list[float]] = [[] for _ in chats]
        for batch in self._batches(feeds):
            input_ids, mask = self._pad_left([feeds[i] for i in batch])
            with self._autocast():
                logits = self.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]
            probs = torch.softmax(logits.float(), dim=-1)
            self.stats["prompt_tokens"] += int(mask.sum())
            for row, i in enumerate(batch):
                out[i] = [float(probs[row, t]) for t in heads[i]]
        return out


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
