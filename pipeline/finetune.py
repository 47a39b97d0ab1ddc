"""Supervised fine-tuning with transformers' Trainer: LoRA (peft) or full, loss on responses only.

Every example is a chat whose last message is the assistant's target. The prompt part (all
messages before it, rendered with the model's chat template) carries label -100; only the target
and the template's end-of-turn marker are learned.

With ``processes`` above 1 the training runs data-parallel in that many processes
(:mod:`pipeline.finetune_launch` starts them, :mod:`pipeline.finetune_worker` is each one);
:func:`run_training` is the same code in both cases.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import (DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments,
                          set_seed)
from transformers.trainer_pt_utils import LengthGroupedSampler

from pipeline.settings import TrainSection
from pipeline import faults, hardware
from pipeline.dropout import use_lane_dropout
from pipeline.models import load_model, load_tokenizer

log = logging.getLogger(__name__)

IGNORE = -100
MIN_TARGET_TOKENS = 16


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    shortened: bool
    truncated: bool


def encode_example(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> Encoded | None:
    """Token ids and labels for one chat; None when no target token fits.

    If the prompt alone leaves fewer than ``MIN_TARGET_TOKENS`` for the target, the last user
    message is shortened (its end replaced by "..."); the full sequence is then cut at
    ``max_len``. Both are reported so callers can count them.
    """
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message of a training chat must be the assistant's target")
    prompt_msgs = [dict(m) for m in messages[:-1]]
    shortened = False
    for _ in range(4):
        prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt <= max_len - MIN_TARGET_TOKENS:
            break
        user = prompt_msgs[-1]["content"]
        keep = max(0, int(len(user) * (max_len - MIN_TARGET_TOKENS) / n_prompt) - 64)
        prompt_msgs[-1]["content"] = user[:keep].rstrip() + " ..."
        shortened = True
    else:
        return None
    full = tokenizer.apply_chat_template(prompt_msgs + [messages[-1]], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template does not render the prompt as a prefix of the full chat; "
                         "set model.chat_template to one that does")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE if start < len(prompt) else tok for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE for x in labels):
        return None
    return Encoded(ids, labels, shortened, truncated)


def build_dataset(chats: Sequence[list[dict[str, str]]], tokenizer, max_len: int) -> tuple[Dataset, dict[str, int]]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    counts = {"examples": 0, "shortened_prompt": 0, "truncated": 0, "dropped_no_target": 0, "target_tokens": 0, "tokens": 0}
    for chat in chats:
        enc = encode_example(chat, tokenizer, max_len)
        if enc is None:
            counts["dropped_no_target"] += 1
            continue
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
        rows["length"].append(len(enc.input_ids))
        counts["examples"] += 1
        counts["shortened_prompt"] += enc.shortened
        counts["truncated"] += enc.truncated
        counts["tokens"] += len(enc.input_ids)
        counts["target_tokens"] += sum(1 for x in enc.labels if x != IGNORE)
    if not rows["input_ids"]:
        raise ValueError("no training example has a target token within max_seq_len")
    return Dataset.from_dict(rows), counts


OUTPUT_CHUNK_ELEMENTS = 2**25
"""Logits computed at once by the output loss (128 MiB in fp32): 682 target rows of a
49,152-token vocabulary."""


class OutputCrossEntropy(torch.autograd.Function):
    """``scale`` times the summed cross-entropy of ``targets`` under the logits
    ``hidden @ weight.T (+ bias)``, computed over chunks of rows, with the gradients computed
    in the same pass.

    Autograd would keep the whole ``(targets, vocabulary)`` logits, their fp32 copy, the
    log-softmax and its gradient alive at once, the largest allocations of fine-tuning with a
    large vocabulary such as SmolLM2's 49,152 tokens. Here one chunk of rows exists at a time. The numerics are those of the unchunked path: under autocast the
    projection runs in the autocast dtype, softmax and loss in fp32, and the gradient of the
    logits, already scaled (the mean's ``1 / count``), is cast back to the projection's dtype
    before the backward matmuls, so it rounds as autograd's would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            rows = max(1, OUTPUT_CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, h.shape[0], rows):
                h_c, t_c = h[start : start + rows], targets[start : start + rows]
                logits = torch.nn.functional.linear(h_c, w, b).float()
                lse = torch.logsumexp(logits, -1)
                total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t_c), device=grad.device), t_c] -= 1
                grad *= scale
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start : start + rows] = grad @ w
                if need_w:
                    grad_w += (grad.t() @ h_c).float()
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None)


def target_only_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                     num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The causal-LM loss of ``labels``, with output logits computed for target positions only.

    transformers computes logits (and their fp32 copy, softmax and gradient) for every position
    and then ignores the ones labelled -100. Here the decoder's hidden states at the positions
    whose next token is a target go through the output projection, and no others, in chunks
    (:class:`OutputCrossEntropy`): the same loss (mean over target tokens, or sum /
    ``num_items_in_batch`` under gradient accumulation, as transformers' own), for a fraction of
    the output work and memory where prompts are long. Backward-model training is the extreme
    case: the long response is the prompt and only the short instruction is learned.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    head = causal_lm.get_output_embeddings()
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    count = float(count) or 1.0  # no target in the batch: a loss of 0, no gradient
    if type(head) is not torch.nn.Linear:  # an adapted or otherwise wrapped head: plain autograd
        logits = head(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum") / count
    return OutputCrossEntropy.apply(hidden[:, :-1][keep], head.weight, head.bias, targets[keep], 1.0 / count)


def supports_target_only_loss(model) -> bool:
    """Plain causal LMs only: a model that post-processes its logits (soft-capping, scaling)
    keeps transformers' own loss."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal_lm.config
    special = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    return not special and hasattr(causal_lm, "get_decoder") and causal_lm.get_output_embeddings() is not None


class TargetLossTrainer(Trainer):
    """Trainer whose loss computes output logits only where there is a target (see
    :func:`target_only_loss`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        # FSDP and ZeRO-3 shard the weights and gather them in hooks around the model's own forward:
        # the decoder and output projection cannot be reached past it, so they keep the stock loss.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if return_outputs or sharded or not supports_target_only_loss(inner):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def loss(**_):
            # Mixed precision is applied by accelerate around the model's own forward; the decoder
            # and output projection called directly need its autocast context explicitly.
            with self.accelerator.autocast():
                return target_only_loss(inner, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                                        num_items_in_batch)

        if model is inner:
            return loss()
        # DDP synchronises gradients only for a pass through its own forward: the loss goes through it.
        with _forward_replaced(inner, loss):
            value = model(input_ids=inputs["input_ids"])
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Each process's loss is its targets' sum over the targets of all processes, and DDP
            # averages gradients over processes: scaled back, the step's gradient is that of the
            # global batch's mean, as in one process (transformers does the same for its own loss).
            value = value * self.accelerator.num_processes
        return value

    def _get_train_sampler(self, train_dataset=None):
        # Length grouping shuffles megabatches of a multiple of the batch size; the size is the
        # global batch (one process's examples per optimizer step times the processes), so that
        # every process count sees the examples in the same order.
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return sampler

    def _save_optimizer_and_scheduler(self, output_dir):
        # Between the checkpoint's weights and the rest of it: a fault site (pipeline.faults).
        faults.checkpoint("train.checkpoint", output_dir)
        super()._save_optimizer_and_scheduler(output_dir)


class _forward_replaced:
    """Within the block, ``module``'s forward is ``fn`` (restoring whatever instance attribute
    accelerate's mixed precision may have put there)."""

    def __init__(self, module, fn):
        self.module, self.fn = module, fn

    def __enter__(self):
        self.saved = self.module.__dict__.get("forward")
        self.module.forward = self.fn

    def __exit__(self, *exc):
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


class FaultSites(TrainerCallback):
    """The end of every optimizer step as a fault site (:mod:`pipeline.faults`); inert otherwise."""

    def on_step_end(self, args, state, control, **kwargs):
        faults.checkpoint("train.step")


def training_model(base: str, cfg: TrainSection, bf16: bool):
    """The model to train: for LoRA, adapters (kept in fp32) on a frozen base; for full
    fine-tuning, the whole model in fp32 (master weights; bf16 comes from autocast).

    Under bf16 a LoRA base is loaded in bf16: its weights never change, so an fp32 copy would
    only cost twice the memory (a 7B base: 28 instead of 14 GB) and a cast of every weight at
    every step. The benchmark compares the loss curves of both dtypes step by step.
    On a CPU the adapters' dropout draws its masks four elements per random number
    (:mod:`pipeline.dropout`).
    """
    if cfg.method != "lora":
        return load_model(base, dtype=torch.float32)
    from peft import LoraConfig, get_peft_model

    model = load_model(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            layers_to_transform=_top_layers(model, cfg.lora_layers),
        ),
        autocast_adapter_dtype=True,  # adapters in fp32 whatever the base's dtype
    )
    if not torch.cuda.is_available():  # Trainer trains on the CPU (see finetune's use_cpu)
        use_lane_dropout(model)
    return model


def finetune(
    base: str,
    chats: Sequence[list[dict[str, str]]],
    cfg: TrainSection,
    out_dir: Path,
    scratch: Path,
    seed: int,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``chats`` and save the result (a LoRA adapter or full weights,
    safetensors) plus the tokenizer to ``out_dir``. Returns training statistics.

    Resumes from the last whole checkpoint in ``scratch`` (``save_steps``), in one process or
    several."""
    resume = last_complete_checkpoint(scratch / "trainer")
    if cfg.processes > 1:
        from pipeline.finetune_launch import launch

        return launch(base, chats, cfg, out_dir, scratch, seed, chat_template, resume)
    return run_training(base, chats, cfg, out_dir, scratch, seed, chat_template, resume)


def per_process_batch(cfg: TrainSection, world: int) -> tuple[int, int]:
    """One process's micro-batch and accumulation steps: together over ``world`` processes, the
    global batch ``batch_size * grad_accum``."""
    if cfg.batch_size % world == 0:
        return cfg.batch_size // world, cfg.grad_accum
    if cfg.grad_accum % world == 0:
        return cfg.batch_size, cfg.grad_accum // world
    raise ValueError(f"a global batch of {cfg.batch_size} x {cfg.grad_accum} cannot be split over {world} processes")


def training_arguments(cfg: TrainSection, scratch: Path, seed: int, bf16: bool, world: int) -> TrainingArguments:
    """The Trainer's arguments; with ``world`` 1 exactly those of single-process training."""
    micro, accum = per_process_batch(cfg, world)
    extra: dict[str, Any] = {}
    if cfg.min_learning_rate:  # linear to a floor: transformers' polynomial decay of power 1
        extra |= {"lr_scheduler_type": "polynomial",
                  "lr_scheduler_kwargs": {"lr_end": cfg.min_learning_rate, "power": 1.0}}
    if cfg.gradient_checkpointing:
        extra |= {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    if world > 1:
        extra |= {"ddp_backend": None if torch.cuda.is_available() else "gloo", "ddp_find_unused_parameters": False}
        if cfg.distributed == "fsdp":
            extra |= {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                    "state_dict_type": "FULL_STATE_DICT"}}
        elif cfg.distributed == "deepspeed":
            extra["deepspeed"] = {
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
            }
    return TrainingArguments(**{
        "output_dir": str(scratch / "trainer"),
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_ratio,  # a float below 1 is a ratio of total steps (transformers 5)
        "weight_decay": cfg.weight_decay,
        "optim": "adamw_torch",
        "bf16": bf16,
        "use_cpu": not torch.cuda.is_available(),
        "train_sampling_strategy": "group_by_length" if cfg.group_by_length else "random",
        "length_column_name": "length",
        "save_strategy": "steps" if cfg.save_steps > 0 else "no",
        "save_steps": cfg.save_steps if cfg.save_steps > 0 else 500,
        "save_only_model": False,
        "logging_steps": cfg.logging_steps,
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "disable_tqdm": False,
        **extra,
    })


def run_training(
    base: str,
    chats: Sequence[list[dict[str, str]]],
    cfg: TrainSection,
    out_dir: Path,
    scratch: Path,
    seed: int,
    chat_template: str | None,
    resume: str | None,
) -> dict[str, Any]:
    """Train in this process, alone or as one of ``WORLD_SIZE`` data-parallel processes (set by
    the launcher). The first process writes the model, the log and the statistics it returns;
    the others return None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_seed(seed)
    tokenizer = load_tokenizer(base, chat_template)
    tokenizer.padding_side = "right"
    dataset, counts = build_dataset(chats, tokenizer, cfg.max_seq_len)
    bf16 = hardware.use_bf16(cfg.bf16)
    model = training_model(base, cfg, bf16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = training_arguments(cfg, scratch, seed, bf16, world)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
    trainer = TargetLossTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                processing_class=tokenizer, callbacks=[FaultSites()])
    if resume:
        log.info("resuming training from %s", resume)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started

    # Sharded weights are gathered by every process; only the first writes them.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled else None
    if not trainer.is_world_process_zero():
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = trainer.accelerator.unwrap_model(trainer.model)
    saved.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state} if state is not None else {}))
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    if cfg.method == "lora":
        _point_adapter_at(out_dir, base)
    history = [h for h in trainer.state.log_history if "loss" in h]
    (out_dir.parent / "logs").mkdir(exist_ok=True)
    with open(out_dir.parent / "logs" / "train_log.jsonl", "w", encoding="utf-8") as fh:
        for h in trainer.state.log_history:
            fh.write(json.dumps(h) + "\n")
    epochs = cfg.epochs if cfg.max_steps <= 0 else cfg.max_steps * cfg.batch_size * cfg.grad_accum / max(1, counts["examples"])
    return {
        **counts,
        "method": cfg.method,
        "bf16": bf16,
        "steps": trainer.state.global_step,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(counts["tokens"] * epochs / seconds, 1) if seconds > 0 else None,
        "resumed_from": resume,
        "trainable_parameters": trainable,
    } | ({"processes": world, "distributed": _strategy(trainer)} if world > 1 else {}) | (
        {"activation_checkpointing": saved.is_activation_checkpointing} if cfg.gradient_checkpointing else {})


def _strategy(trainer: Trainer) -> str:
    """How the processes shared the model, as accelerate set it up (not as asked)."""
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    return type(trainer.model_wrapped).__name__  # DistributedDataParallel


ADDED_SETTINGS = {"min_learning_rate": 0.0, "gradient_checkpointing": False, "processes": 1, "distributed": "ddp"}
"""Training settings added after runs were made, with the values that train as before them."""


def cache_settings(cfg: TrainSection) -> dict[str, Any]:
    """The section's settings for a stage's cache key: those of :data:`ADDED_SETTINGS` only where
    they differ from the values that train as before, so that earlier runs stay cached."""
    return {k: v for k, v in cfg.model_dump().items() if k not in ADDED_SETTINGS or v != ADDED_SETTINGS[k]}


def last_complete_checkpoint(folder: Path) -> str | None:
    """The latest trainer checkpoint in ``folder`` that was saved whole, or None.

    The Trainer writes a checkpoint's files in place and ``trainer_state.json`` last, so a process
    killed while saving leaves a folder without it (or with it cut short); resuming from that
    would fail on every later run. Such folders are removed and the one before is taken."""
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in reversed(checkpoints):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return str(checkpoint)
        except (OSError, ValueError):
            log.warning("trainer checkpoint %s was not saved whole (cut short by a crash); removing it", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def _top_layers(model, n: int | None) -> list[int] | None:
    if n is None:
        return None
    total = model.config.num_hidden_layers
    return list(range(max(0, total - n), total))


def _point_adapter_at(out_dir: Path, base: str) -> None:
    """Record the resolved base path in the adapter config, so loading needs no other state, and
    write it canonically: peft saves ``target_modules`` from a set, whose order changes with
    Python's hash seed, which would change the stage's output digest from run to run."""
    path = out_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

