import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.settings import TrainSection
from pipeline.finetune import IGNORE, encode_example, finetune, target_only_loss
from pipeline.models import is_adapter, load_model, load_tokenizer

CHATS = [
    [{"role": "system", "content": "Answer in the style of an AI Assistant."},
     {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. Adding a number to itself doubles it."}]
    for i in range(12)
]


def test_prompt_tokens_carry_ignore_label(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    enc = encode_example(CHATS[0], tok, max_len=512)
    prompt = tok.apply_chat_template(CHATS[0][:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tok.decode([t for t in enc.labels if t != IGNORE]).startswith("0 plus 0 is 0.")
    assert tok.decode(enc.labels[-2:]).strip().endswith("<|im_end|>")  # learns to stop


def test_long_prompt_is_shortened_so_target_survives(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    chat = [{"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "Short instruction?"}]
    enc = encode_example(chat, tok, max_len=128)
    assert enc.shortened and len(enc.input_ids) <= 128
    assert "Short instruction?" in tok.decode([t for t in enc.labels if t != IGNORE])


def test_long_target_is_truncated_and_counted(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    chat = [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": "many words " * 500}]
    enc = encode_example(chat, tok, max_len=64)
    assert enc.truncated and not enc.shortened and len(enc.input_ids) == 64


def _train(tiny_model, tmp_path, **overrides):
    settings = dict(max_steps=4, batch_size=4, learning_rate=5e-3, logging_steps=1, bf16="off",
                    lora_target_modules=["q_proj", "v_proj"])
    cfg = TrainSection(**{**settings, **overrides})
    stats = finetune(str(tiny_model), CHATS, cfg, tmp_path / "model", tmp_path / "scratch", seed=0)
    return cfg, stats


def test_lora_trains_adapter_only(tiny_model, tmp_path):
    _, stats = _train(tiny_model, tmp_path)
    out = tmp_path / "model"
    assert is_adapter(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it moved
    base_before = load_model(str(tiny_model)).state_dict()
    base_file = load_file(tiny_model / "model.safetensors")
    for name, tensor in base_file.items():
        assert torch.equal(tensor, base_before[name])  # base weights on disk untouched
    merged = load_model(str(out))
    changed = [n for n, p in merged.state_dict().items() if n in base_before and not torch.equal(p, base_before[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    assert stats["steps"] == 4 and stats["examples"] == 12
    assert (tmp_path / "logs" / "train_log.jsonl").exists()


def test_full_finetune_changes_every_weight(tiny_model, tmp_path):
    _, stats = _train(tiny_model, tmp_path, method="full")
    before = load_model(str(tiny_model)).state_dict()
    after = load_model(str(tmp_path / "model")).state_dict()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged
    assert stats["final_loss"] < stats["first_loss"]


def test_lora_layers_restricts_to_top_layers(tiny_model, tmp_path):
    _train(tiny_model, tmp_path, lora_layers=1)
    adapter = load_file(tmp_path / "model" / "adapter_model.safetensors")
    assert adapter and all(".layers.1." in k for k in adapter)


def test_loss_decreases_on_repeated_data(tiny_model, tmp_path):
    cfg = TrainSection(max_steps=15, batch_size=4, learning_rate=1e-2, logging_steps=1, bf16="off", method="full",
                       warmup_ratio=0.0, lr_scheduler="constant")
    stats = finetune(str(tiny_model), CHATS[:4], cfg, tmp_path / "model", tmp_path / "scratch", seed=0)
    assert stats["final_loss"] < 0.8 * stats["first_loss"]


@pytest.mark.parametrize("bad", [[{"role": "user", "content": "no target"}]])
def test_chat_must_end_with_assistant(tiny_model, bad):
    with pytest.raises(ValueError, match="assistant"):
        encode_example(bad, load_tokenizer(str(tiny_model)), 64)


def _adapted(model, targets: list[str]):
    """``model`` with a rank-4 LoRA on ``targets``; peft starts B at zero, so it is moved for the
    adapter to take part in the loss."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_target_only_loss_equals_transformers_loss(tiny_model, lora, chunked, monkeypatch):
    """Same value and same gradients as the model's own loss over every position (output
    weights included, when they train), in one chunk or in chunks of 2 target rows."""
    from pipeline import finetune as ft

    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    if chunked:
        monkeypatch.setattr(ft, "OUTPUT_CHUNK_ELEMENTS", 2 * model.config.vocab_size)
    if lora:
        model = _adapted(model, ["q_proj", "v_proj"])
    ids = torch.randint(5, 200, (3, 20))
    labels = ids.clone()
    labels[:, :8] = IGNORE
    labels[2, 15:] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    params = [p for p in model.parameters() if p.requires_grad]

    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want_grads = torch.autograd.grad(want, params)
    got = target_only_loss(model, ids, mask, labels)
    got_grads = torch.autograd.grad(got, params)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # Under gradient accumulation: sum over this batch's targets / all targets of the step.
    scaled = target_only_loss(model, ids, mask, labels, num_items_in_batch=100)
    assert float(scaled) == pytest.approx(float(want) * int((labels[:, 1:] != IGNORE).sum()) / 100, rel=1e-5)


def test_target_only_loss_of_a_wrapped_output_head_and_of_no_targets(tiny_model):
    """An adapted output projection takes plain autograd (still the model's own loss); a batch
    without any target gives a loss of 0 and zero gradients, not NaN."""
    torch.manual_seed(0)
    model = _adapted(load_model(str(tiny_model)), ["lm_head"])
    ids = torch.randint(5, 200, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    params = [p for p in model.parameters() if p.requires_grad]
    want = model(input_ids=ids, labels=labels).loss
    got = target_only_loss(model, ids, None, labels)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)

    plain = load_model(str(tiny_model))
    none = target_only_loss(plain, ids, None, torch.full_like(ids, IGNORE))
    grads = torch.autograd.grad(none, [p for p in plain.parameters() if p.requires_grad], allow_unused=True)
    assert float(none) == 0.0 and all(g is None or not g.any() for g in grads)


def test_trainer_with_target_only_loss_matches_transformers_loss_under_bf16(tiny_model, tmp_path, monkeypatch):
    """The Trainer's loss, bf16 mixed precision included (LoRA on a bf16 base): the same loss at
    every step as transformers' own. A loss computed outside accelerate's autocast parts from it
    at the third step by 2.7e-4.

    Without LoRA dropout: with it, the two losses matched to 1e-7 for three steps and then
    differed by 4e-5, although a single step's gradients were bit-identical under the same
    masks (which step's rounding parts them was not traced)."""
    import transformers

    from pipeline import finetune as ft

    def step_losses(out):
        rows = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    _, ours = _train(tiny_model, tmp_path / "ours", bf16="on", lora_dropout=0.0)
    monkeypatch.setattr(ft, "TargetLossTrainer", transformers.Trainer)
    _, theirs = _train(tiny_model, tmp_path / "theirs", bf16="on", lora_dropout=0.0)
    assert ours["bf16"] and theirs["bf16"]
    mine, stock = step_losses(tmp_path / "ours"), step_losses(tmp_path / "theirs")
    assert len(mine) == len(stock) == 4
    assert mine == pytest.approx(stock, rel=2e-5)


@pytest.mark.parametrize("method,bf16,base_dtype", [
    ("lora", True, torch.bfloat16), ("lora", False, torch.float32), ("full", True, torch.float32)])
def test_training_model_dtypes(tiny_model, method, bf16, base_dtype):
    """Under bf16 a LoRA base is held in bf16 (it never changes); adapters and full fine-tuning's
    weights stay fp32 (autocast computes in bf16, the optimizer updates fp32)."""
    from pipeline.finetune import training_model

    model = training_model(str(tiny_model), TrainSection(method=method, lora_target_modules=["q_proj"]), bf16)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32}
    assert frozen == ({base_dtype} if method == "lora" else set())
