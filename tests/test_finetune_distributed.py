"""Data-parallel fine-tuning (``processes`` > 1): two processes on the CPU (gloo) follow one
process's loss curve, resume after a kill, and refuse what accelerate cannot do on a CPU.

The tolerance of the curves, a relative 1e-5 per step, is fp32 rounding: the two runs see the
same examples at every optimizer step, but pad and multiply them in micro-batches of another
shape and add the two processes' gradients in another order. Measured, they part by at most
1e-7 relative over six steps. A run that saw other examples per step (the control below: half
the global batch) parts from the first step by more than 1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline import faults
from pipeline.finetune import finetune
from pipeline.models import load_model
from pipeline.settings import TrainSection

CHATS = [
    [{"role": "system", "content": "Answer in the style of an AI Assistant."},
     {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. Adding a number to itself doubles it."}]
    for i in range(12)
]
TOLERANCE = 1e-5


def _run(tiny_model, folder, **overrides):
    settings = dict(method="full", max_steps=6, batch_size=4, learning_rate=5e-3, logging_steps=1, bf16="off",
                    warmup_ratio=0.0)
    cfg = TrainSection(**{**settings, **overrides})
    stats = finetune(str(tiny_model), CHATS, cfg, folder / "model", folder / "scratch", seed=0)
    return stats, _losses(folder)


def _losses(folder) -> list[float]:
    rows = [json.loads(line) for line in (folder / "logs" / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _same_curve(one: list[float], two: list[float], label: str) -> None:
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    assert len(one) == len(two) and worst <= TOLERANCE, (
        f"{label}: worst relative difference {worst:.2e} (tolerance {TOLERANCE:.0e})\n"
        f"  one process:   {one}\n  two processes: {two}")


def test_two_processes_follow_one_process(tiny_model, tmp_path):
    """Full fine-tuning, length-grouped batches, global batch 4 (2 per process): the same loss at
    every step and the same weights, written once, as safetensors."""
    one_stats, one = _run(tiny_model, tmp_path / "one")
    two_stats, two = _run(tiny_model, tmp_path / "two", processes=2)
    _, half = _run(tiny_model, tmp_path / "half", batch_size=2)
    assert two_stats["processes"] == 2 and two_stats["distributed"] == "DistributedDataParallel"
    assert two_stats["steps"] == one_stats["steps"] == 6
    _same_curve(one, two, "one vs two processes")
    assert abs(half[0] - one[0]) / one[0] > 1e-2, (one, half)  # the comparison can tell other batches apart
    a, b = load_model(str(tmp_path / "one" / "model")).state_dict(), load_model(str(tmp_path / "two" / "model")).state_dict()
    base = load_model(str(tiny_model)).state_dict()
    for name in base:
        assert not torch.equal(b[name], base[name]), name  # trained
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    assert sorted(p.name for p in (tmp_path / "two" / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "two" / "model").glob("*.bin"))


def test_lora_with_accumulation_split_over_processes(tiny_model, tmp_path):
    """LoRA (without dropout, whose masks follow each process's shapes), random order, batch 1 x
    4 accumulation steps: two processes take 2 accumulation steps each."""
    lora = dict(method="lora", lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"], batch_size=1,
                grad_accum=4, group_by_length=False, max_steps=4)
    _, one = _run(tiny_model, tmp_path / "one", **lora)
    _, two = _run(tiny_model, tmp_path / "two", processes=2, **lora)
    _same_curve(one, two, "LoRA, accumulation split")
    adapter = load_file(tmp_path / "two" / "model" / "adapter_model.safetensors")
    assert adapter and all("q_proj" in k or "v_proj" in k for k in adapter)


def test_two_processes_resume_after_a_kill(tiny_model, tmp_path, monkeypatch):
    """Both processes killed at their third optimizer step (a checkpoint every 2): the launch
    fails, and the same call resumes from checkpoint-2 and ends where an unkilled run ends."""
    settings = dict(processes=2, max_steps=4, save_steps=2, lr_scheduler="constant")
    _, whole = _run(tiny_model, tmp_path / "whole", **settings)
    mark = tmp_path / "kills.jsonl"
    monkeypatch.setenv(faults.KILL_ENV, "train.step:3")
    monkeypatch.setenv(faults.MARK_ENV, str(mark))
    with pytest.raises(RuntimeError, match="2 processes"):
        _run(tiny_model, tmp_path / "killed", **settings)
    assert {json.loads(x)["site"] for x in mark.read_text().splitlines()} == {"train.step"}
    assert not (tmp_path / "killed" / "model").exists()
    monkeypatch.delenv(faults.KILL_ENV)
    stats, resumed = _run(tiny_model, tmp_path / "killed", **settings)
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps"] == 4
    _same_curve(whole[2:], resumed[-2:], "resumed vs whole, steps 3-4")


def test_gradient_checkpointing_keeps_the_loss_curve(tiny_model, tmp_path):
    _, plain = _run(tiny_model, tmp_path / "plain", max_steps=3)
    stats, recomputed = _run(tiny_model, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True)
    assert stats["activation_checkpointing"] is True
    _same_curve(plain, recomputed, "gradient checkpointing")


def test_two_processes_in_bf16_with_checkpointing(tiny_model, tmp_path):
    """The paper-scale settings (full fine-tuning, bf16 autocast, gradient checkpointing) in two
    processes. bf16 keeps 8 significant bits (a relative rounding of 2**-9, 2e-3, per value), and
    micro-batches of another shape round other products: the curves part by 4.4e-4 measured over
    four steps, within 2e-3 (the tolerance of one bf16 rounding)."""
    settings = dict(bf16="on", gradient_checkpointing=True, max_steps=4)
    _, one = _run(tiny_model, tmp_path / "one", **settings)
    stats, two = _run(tiny_model, tmp_path / "two", processes=2, **settings)
    assert stats["bf16"] and stats["activation_checkpointing"] is True
    worst = max(abs(a - b) / a for a, b in zip(one, two))
    assert len(one) == len(two) == 4 and worst <= 2e-3, f"worst {worst:.2e}\n  one: {one}\n  two: {two}"


def test_paper_schedule_decays_linearly_to_its_floor(tiny_model, tmp_path):
    """The paper's full fine-tuning: 1e-5 falling linearly to 9e-6, weight decay 0.1."""
    _run(tiny_model, tmp_path, learning_rate=1e-5, min_learning_rate=9e-6, lr_scheduler="linear",
         weight_decay=0.1, max_steps=5)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in rows if "learning_rate" in r]
    assert rates[0] == pytest.approx(1e-5)
    steps = [a - b for a, b in zip(rates, rates[1:])]
    assert all(s == pytest.approx(2e-7, rel=1e-6) for s in steps), rates  # (1e-5 - 9e-6) / 5 per step
    assert rates[-1] == pytest.approx(9e-6 + 2e-7)


@pytest.mark.parametrize("bad,match", [
    (dict(processes=3, batch_size=4, grad_accum=2), "multiple of processes"),
    (dict(min_learning_rate=9e-6, learning_rate=1e-5, lr_scheduler="cosine"), "linear"),
    (dict(min_learning_rate=2e-5, learning_rate=1e-5, lr_scheduler="linear"), "above"),
])
def test_settings_refuse_what_cannot_work(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainSection(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs FSDP runs (tests/test_finetune_distributed.py, cuda)")
def test_fsdp_on_a_cpu_is_refused(tiny_model, tmp_path):
    """accelerate sets FSDP up on GPUs only: asked for on a CPU it would silently train as DDP."""
    with pytest.raises(ValueError, match="GPUs only"):
        _run(tiny_model, tmp_path, processes=2, distributed="fsdp")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_on_two_gpus_follows_one_gpu(tiny_model, tmp_path):
    """FSDP2 over two GPUs (NCCL): the loss curve of one GPU, and full weights gathered into one
    safetensors file."""
    _, one = _run(tiny_model, tmp_path / "one")
    stats, two = _run(tiny_model, tmp_path / "two", processes=2, distributed="fsdp")
    assert stats["distributed"] == "fsdp2"
    _same_curve(one, two, "one GPU vs FSDP on two")
    a, b = load_model(str(tmp_path / "one" / "model")).state_dict(), load_model(str(tmp_path / "two" / "model")).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name


def test_cache_key_keeps_earlier_runs_and_tells_new_settings_apart():
    """The settings added for distributed training enter a stage's cache key only when they
    change the training, so stages trained before them stay cached."""
    from pipeline.finetune import ADDED_SETTINGS, cache_settings

    assert not set(ADDED_SETTINGS) & set(cache_settings(TrainSection()))
    assert cache_settings(TrainSection(processes=2))["processes"] == 2
    assert set(cache_settings(TrainSection())) == set(TrainSection.model_fields) - set(ADDED_SETTINGS)
