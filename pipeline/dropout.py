"""Dropout for LoRA training on CPUs, with masks drawn four elements per random number.

torch's CPU dropout draws one Bernoulli sample per element, a visible share of a LoRA step whose
every projection input is dropped out, and no cheaper in bf16 than in fp32. Here each 64-bit
random integer is split into four 16-bit lanes and an element is dropped when its lane falls
below ``p * 2**16``: a quarter of the random draws (timings in benchmarks/README.md).

``p`` is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031) and kept elements are scaled by
1 / (1 - rounded p), so the expectation of every element is unchanged. GPUs draw dropout masks
with a fused generator already; :func:`use_lane_dropout` leaves them alone.
"""

from __future__ import annotations

import torch
from torch import nn

LANE_BITS = 16
LANES = 64 // LANE_BITS


class LaneDropout(nn.Module):
    """Inverted dropout with probability ``p`` (rounded to 1/65536), identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * 2**LANE_BITS)
        self.scale = 2**LANE_BITS / (2**LANE_BITS - self.cut)

    @property
    def effective_p(self) -> float:
        return self.cut / 2**LANE_BITS

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        n = shape.numel()
        # The full int64 range, so that every 16-bit lane of every draw is uniform.
        words = torch.randint(-(2**63), 2**63 - 1, ((n + LANES - 1) // LANES,), dtype=torch.int64, device=device)
        lanes = words.view(torch.int16)[:n].view(shape)
        return lanes >= self.cut - 2 ** (LANE_BITS - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        return x * self.keep_mask(x.shape, x.device) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_lane_dropout(model: nn.Module) -> int:
    """Replace the LoRA dropout modules of a peft model (``lora_dropout[adapter]``, plain
    ``nn.Dropout`` with p > 0) by :class:`LaneDropout`; returns how many were replaced. Only for
    training on a CPU."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is nn.Dropout and layer.p > 0:
                dropouts[name] = LaneDropout(layer.p)
                replaced += 1
    return replaced
