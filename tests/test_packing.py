"""Linear weights packed once for oneDNN: same outputs as nn.Linear, bit for bit, through the
model, the engine's generation and its scoring; applied by make_engine only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.config import RunConfig
from pipeline.engine import SamplingParams, TransformersEngine
from pipeline.models import load_model, load_tokenizer
from pipeline.packing import PackedLinear, pack_linears, packing_supported

BF16_CPU = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
needs_bf16 = pytest.mark.skipif(not BF16_CPU, reason="this CPU's oneDNN has no bf16 kernels")

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain tides in one long sentence please."}],
    [{"role": "user", "content": "What is the capital of France, and why is it that city?"}],
]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """128 wide, so that every product, even one row at a time, is big enough for torch to send
    to oneDNN itself (as all of SmolLM2-135M's are); the 32-wide test model's are not."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide-llama"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def bf16_models(wide_model):
    plain = load_model(str(wide_model)).to(torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    count = pack_linears(packed)
    return plain, packed, count


def _linears(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m) is nn.Linear)


@needs_bf16
def test_every_linear_is_packed_and_logits_are_identical(bf16_models):
    plain, packed, count = bf16_models
    # 7 projections per layer, 2 layers, and the output head (tied to the embedding, which stays).
    assert count == _linears(plain) == 2 * 7 + 1
    assert _linears(packed) == 0 and sum(isinstance(m, PackedLinear) for m in packed.modules()) == count
    assert packed.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(0, plain.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.inference_mode():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = packed(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


@needs_bf16
def test_engine_outputs_are_identical_with_packed_weights(bf16_models, wide_model):
    plain, packed, _ = bf16_models
    tok = load_tokenizer(str(wide_model))
    engines = [TransformersEngine(m, tok, batch_size=2) for m in (plain, packed)]
    for params in (SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)):
        texts = [[c.text for c in e.generate(CHATS, params)] for e in engines]
        assert texts[0] == texts[1]
    probs = [e.choice_probs(CHATS, "Score:", [" 1", " 2", " 3"]) for e in engines]
    assert probs[0] == probs[1]


@needs_bf16
def test_small_products_agree_to_bf16_rounding(tiny_model):
    """Below oneDNN's size threshold torch multiplies with its own kernel, which can round the
    last bit differently from the packed oneDNN one: the 32-wide model's logits still agree to
    within bf16 rounding."""
    plain = load_model(str(tiny_model)).to(torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    ids = torch.randint(0, plain.config.vocab_size, (2, 1))
    with torch.inference_mode():
        want, got = plain(input_ids=ids).logits.float(), packed(input_ids=ids).logits.float()
    assert torch.allclose(got, want, rtol=2**-6, atol=2**-6)


def test_fp32_weights_are_left_alone(tiny_model):
    model = load_model(str(tiny_model))
    assert not packing_supported(model)
    before = _linears(model)
    assert pack_linears(model) == 0 and _linears(model) == before


@needs_bf16
def test_packed_layer_rejects_fp32_input():
    layer = PackedLinear(nn.Linear(8, 4).to(torch.bfloat16))
    with pytest.raises(TypeError, match="bf16"):
        layer(torch.randn(2, 8))


@needs_bf16
@pytest.mark.parametrize("pack", [True, False])
def test_make_engine_packs_by_config(tiny_model, pack):
    from harness.stages import make_engine

    cfg = RunConfig.model_validate({"engine": {"bf16": "on", "pack_weights": pack, "device": "cpu"}})
    engine = make_engine(str(tiny_model), cfg, batch_size=2)
    packed = sum(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert packed == (2 * 7 + 1 if pack else 0)
