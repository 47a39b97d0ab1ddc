"""LoRA dropout with lane-drawn masks: the rate, the scaling, the gradient, eval mode, and the
swap into peft's modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.dropout import LANES, LaneDropout, use_lane_dropout


def test_drop_rate_and_scale():
    torch.manual_seed(0)
    drop = LaneDropout(0.05).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    assert drop.effective_p == pytest.approx(0.05, abs=1 / 2**16)
    kept = y != 0
    assert torch.all(y[kept] == drop.scale) and drop.scale == pytest.approx(1 / (1 - drop.effective_p))
    n = x.numel()
    sigma = (drop.effective_p * (1 - drop.effective_p) / n) ** 0.5
    assert abs(float((~kept).float().mean()) - drop.effective_p) < 5 * sigma
    # Every lane position of the 64-bit draws drops at the same rate (each lane is uniform).
    flat = (~kept).flatten().float()
    for lane in range(LANES):
        share = float(flat[lane::LANES].mean())
        assert abs(share - drop.effective_p) < 5 * sigma * LANES**0.5, lane
    # Expectation preserved: mean of the output stays 1 within sampling error.
    assert float(y.mean()) == pytest.approx(1.0, abs=5 * drop.scale * sigma)


def test_masks_differ_between_calls_and_follow_the_seed():
    drop = LaneDropout(0.3).train()
    x = torch.ones(64, 33)  # an element count that is not a multiple of four
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)
    assert a.shape == x.shape


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(0)
    drop = LaneDropout(0.5).train()
    x = torch.randn(8, 16, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    keep = y.detach() != 0
    assert torch.equal(x.grad, keep.float() * drop.scale)


def test_eval_mode_and_zero_p_are_identity_and_bad_p_is_refused():
    x = torch.randn(4, 4)
    assert LaneDropout(0.5).eval()(x) is x
    assert LaneDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        LaneDropout(1.0)


def test_bf16_input_keeps_its_dtype():
    y = LaneDropout(0.1).train()(torch.ones(16, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_swapped_into_every_lora_dropout(tiny_model):
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_model

    model = get_peft_model(load_model(str(tiny_model)),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    stock = [m for m in model.modules() if type(m) is nn.Dropout and m.p == 0.1]
    assert use_lane_dropout(model) == len(stock) > 0
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p == 0.1]
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, LaneDropout))
    # No dropout configured: peft uses Identity, nothing to replace.
    plain = get_peft_model(load_model(str(tiny_model)),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    assert use_lane_dropout(plain) == 0
