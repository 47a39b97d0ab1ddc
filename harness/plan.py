"""``humpback plan``: what a config will cost, stage by stage, before anything runs.

For each stage (backward model, augmentation, every curation and fine-tuning, every model's
evaluation) it prints the work (items, prompt tokens, new tokens, training tokens), and the wall
time and device-hours on 1, 8 and 64 devices of the given hardware. Work comes from
:mod:`harness.plan_work`; throughputs from :mod:`harness.plan_rates`, where each is either
measured by this project (the file that holds the measurement is named) or an assumption, and
the output marks which. Nothing is loaded or downloaded.

Run as: humpback plan --config configs/paper-7b.yaml --hardware h100 --gpus 1,8,64
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import plan_rates as R
from harness.config import RunConfig
from harness.plan_work import Figures, Work, count_work

LORA_TRAIN_SHARE = 2 / 3
"""LoRA's work per token relative to full fine-tuning's: no weight gradients for the frozen base,
about 4 instead of 6 x parameters FLOPs (assumed; the CPU's measured rate is LoRA's)."""
RECOMPUTE_FACTOR = 8 / 6
"""Gradient checkpointing runs the forward pass again in the backward pass: about 8 instead of 6 x
parameters FLOPs per token (assumed)."""
FULL_TRAIN_BYTES_PER_PARAM = 16
"""Full fine-tuning holds fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter."""


@dataclass(frozen=True)
class Row:
    work: Work
    seconds: float
    """On one device (as if the model fitted)."""
    min_devices: int = 1
    """Fewest devices whose memory holds the stage's model and training state."""

    def wall_seconds(self, devices: int) -> float:
        """Ideal data parallelism, no faster than one item per device."""
        return self.seconds / max(1, min(devices, self.work.items))

    def device_hours(self, devices: int) -> float:
        return self.wall_seconds(devices) * devices / 3600

    def fits(self, devices: int) -> bool:
        return devices >= self.min_devices


@dataclass
class Plan:
    config: str
    model: str
    params: float
    params_source: str
    hardware: R.Hardware
    rates: dict[str, R.Rate]
    """Per kind of work, for this model."""
    devices: list[int]
    rows: list[Row]
    figures: Figures
    warnings: list[str]

    def total_wall(self, devices: int) -> float | None:
        """None when some stage needs more devices than this."""
        if not all(r.fits(devices) for r in self.rows):
            return None
        return sum(r.wall_seconds(devices) for r in self.rows)

    def total_device_hours(self, devices: int) -> float:
        return sum(r.device_hours(devices) for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "model": self.model, "params": self.params, "params_source": self.params_source,
            "hardware": self.hardware.name,
            "rates": {k: {"tokens_per_s": v.tokens_per_s, "source": v.source, "measured": v.measured}
                      for k, v in self.rates.items()},
            "stages": [{**asdict(r.work), "seconds_one_device": r.seconds,
                        "wall_seconds": {str(n): r.wall_seconds(n) if r.fits(n) else None for n in self.devices},
                        "min_devices": r.min_devices,
                        "device_hours": {str(n): r.device_hours(n) for n in self.devices}} for r in self.rows],
            "total": {"wall_seconds": {str(n): self.total_wall(n) for n in self.devices},
                      "device_hours": {str(n): self.total_device_hours(n) for n in self.devices}},
            "figures": {k: {"value": v, "source": self.figures.sources[k]} for k, v in self.figures.values.items()},
            "warnings": self.warnings,
        }


def model_rates(hw: R.Hardware, params: float, given: dict[str, float]) -> dict[str, R.Rate]:
    """The hardware's rates carried to a model of ``params`` parameters, or the user's own."""
    out = {}
    for kind, rate in hw.rates.items():
        if kind in given:
            out[kind] = R.Rate(given[kind], "given (--throughput)", False)
            continue
        scale = hw.reference_params / params
        carried = "" if math.isclose(scale, 1.0) else (
            f"; carried from {hw.reference_params / 1e9:.3g}B to {params / 1e9:.3g}B parameters in inverse proportion "
            f"(assumed)")
        out[kind] = R.Rate(rate.tokens_per_s * scale, rate.source + carried, rate.measured and math.isclose(scale, 1.0))
    return out


def _seconds(work: Work, rates: dict[str, R.Rate], hw: R.Hardware) -> float:
    if work.kind == "train":
        rate = rates["train"].tokens_per_s
        trained_as = "lora" if hw.name == "cpu" else "full"  # what the rate was measured or assumed for
        if work.method != trained_as:
            rate = rate / LORA_TRAIN_SHARE if work.method == "lora" else rate * LORA_TRAIN_SHARE
        return work.train_tokens / rate * (RECOMPUTE_FACTOR if work.recompute else 1.0)
    return work.prompt_tokens / rates["prefill"].tokens_per_s + work.new_tokens / rates["decode"].tokens_per_s


def make_plan(cfg: RunConfig, config_name: str = "", hardware: str = "h100", devices: list[int] | None = None,
              params: float | None = None, throughput: dict[str, float] | None = None,
              corpus_segments: int | None = None, keep_rate: float | None = None) -> Plan:
    """The plan of ``cfg`` on ``hardware``; raises ValueError when a needed size is unknown."""
    hw = R.hardware(hardware)
    if params is None:
        params, params_source = R.model_params(cfg.model.base)
    else:
        params_source = "given (--params)"
    rates = model_rates(hw, params, throughput or {})
    work, figures, warnings = count_work(cfg, corpus_segments, keep_rate)
    need = FULL_TRAIN_BYTES_PER_PARAM * params / 2**30
    shards = math.ceil(need / hw.memory_gib) if hw.memory_gib is not None else 1
    full = [w.stage for w in work if w.kind == "train" and w.method == "full"]
    rows = [Row(w, _seconds(w, rates, hw), shards if w.stage in full else 1) for w in work]
    if full and shards > 1:
        warnings.append(f"full fine-tuning of {params / 1e9:.3g}B parameters holds about {need:.0f} GiB (fp32 "
                        f"weights, gradients, AdamW moments) before activations: more than one device's "
                        f"{hw.memory_gib:g} GiB, so {', '.join(full)} must shard the model over at least {shards} "
                        f"devices (shown as 'needs {shards}')")
    return Plan(config_name, cfg.model.base, params, params_source, hw, rates, sorted(set(devices or [1, 8, 64])),
                rows, figures, warnings)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _n(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.2f}B"
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    return f"{x:,.0f}"


def render(plan: Plan) -> str:
    unit = "machine" if plan.hardware.name == "cpu" else "GPU"
    measured = all(r.measured for r in plan.rates.values())
    lines = [f"plan: {plan.config or 'config'}; model {plan.model}, {plan.params / 1e9:.3g}B parameters "
             f"({plan.params_source})",
             f"hardware: {plan.hardware.description}",
             "throughputs per device, for this model: " + ("MEASURED" if measured else
                                                            "NOT ALL MEASURED (marked ASSUMED below)")]
    for kind, rate in plan.rates.items():
        lines.append(f"  {kind:8s} {rate.tokens_per_s:>12,.1f} tokens/s  {'measured' if rate.measured else 'ASSUMED'}: "
                     f"{rate.source}")
    head = f"{'stage':18s} {'items':>9s} {'prompt tok':>11s} {'new tok':>9s} {'train tok':>10s}"
    head += "".join(f" {f'{n} {unit}' + ('s' if n > 1 else ''):>9s}" for n in plan.devices)
    head += f" {unit + '-hours':>10s}"
    lines += ["", head, "-" * len(head)]
    for r in plan.rows:
        w = r.work
        line = (f"{w.stage:18s} {w.items:>9,} {_n(w.prompt_tokens):>11s} {_n(w.new_tokens):>9s} "
                f"{_n(w.train_tokens):>10s}")
        line += "".join(f" {_duration(r.wall_seconds(n)) if r.fits(n) else f'needs {r.min_devices}':>9s}"
                        for n in plan.devices)
        lines.append(line + f" {r.device_hours(plan.devices[0]):>10.2f}")
    total = (f"{'total':18s} {'':>9s} {_n(sum(r.work.prompt_tokens for r in plan.rows)):>11s} "
             f"{_n(sum(r.work.new_tokens for r in plan.rows)):>9s} {_n(sum(r.work.train_tokens for r in plan.rows)):>10s}")
    total += "".join(f" {_duration(t) if (t := plan.total_wall(n)) is not None else '-':>9s}" for n in plan.devices)
    lines += ["-" * len(head), total + f" {plan.total_device_hours(plan.devices[0]):>10.2f}", ""]
    lines.append(f"{unit}-hours at {plan.devices[0]} {unit}; with more, wall time divides by the devices (ideal "
                 f"data parallelism, assumed; never below one item per device) and {unit}-hours stay the same. "
                 f"Judging (AlpacaEval, head to head, calibration) and data preparation are not included.")
    if any(r.work.recompute for r in plan.rows):
        lines.append("gradient checkpointing: training priced at 8/6 of its plain work (the forward pass runs twice; "
                     "assumed)")
    trained_as = "lora" if plan.hardware.name == "cpu" else "full"
    if any(r.work.kind == "train" and r.work.method != trained_as for r in plan.rows):
        lines.append(f"{'full fine-tuning' if trained_as == 'lora' else 'LoRA'} priced from the {trained_as} rate "
                     f"at 6 vs 4 x parameters FLOPs per token (assumed)")
    lines.append("per-item figures:")
    for key, value in plan.figures.values.items():
        shown = f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
        lines.append(f"  {key} = {shown}: {plan.figures.sources[key]}")
    lines.append("notes on the stages:")
    lines += [f"  {r.work.stage}: {r.work.note}" for r in plan.rows if r.work.note]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="print each stage's work and its expected time and device-hours, before anything runs",
        description="Count the work a config asks for (items, prompt, new and training tokens per stage) and price "
                    "it with throughputs: measured by this project where it has measured them (the 2-core reference "
                    "CPU with SmolLM2-135M, benchmarks/README.md), otherwise assumptions marked ASSUMED with their "
                    "source (a GPU's datasheet peak times an assumed utilisation), or your own --throughput.")
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--hardware", default="h100", choices=R.HARDWARE, help="device kind (default h100)")
    p.add_argument("--gpus", default="1,8,64", help="device counts to show, comma-separated (default 1,8,64)")
    p.add_argument("--throughput", action="append", default=[], metavar="KIND=TOKENS_PER_S",
                   help="your own measured tokens/s per device for this model: prefill, decode or train (repeatable)")
    p.add_argument("--params", type=float, help="model parameters (default: known models, or read from the name)")
    p.add_argument("--corpus-segments", type=int, help="corpus size when corpus.max_segments does not give it "
                                                       "(the paper's: 502000)")
    p.add_argument("--keep-rate", type=float, help="share of augmented pairs curation keeps (default: the paper's A5 "
                                                   "share, assumed)")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _parse_throughput(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        kind, _, value = item.partition("=")
        if kind not in ("prefill", "decode", "train") or not value:
            raise ValueError(f"--throughput {item!r}: expected prefill=N, decode=N or train=N (tokens/s per device)")
        out[kind] = float(value)
        if out[kind] <= 0:
            raise ValueError(f"--throughput {item!r}: must be positive")
    return out


def run(args) -> int:
    from harness.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        devices = [int(x) for x in args.gpus.split(",") if x.strip()]
        if not devices or min(devices) < 1:
            raise ValueError(f"--gpus {args.gpus!r}: give positive counts, e.g. 1,8,64")
        if args.keep_rate is not None and not 0 <= args.keep_rate <= 1:
            raise ValueError("--keep-rate must lie between 0 and 1")
        plan = make_plan(cfg, args.config or "defaults", args.hardware, devices, args.params,
                         _parse_throughput(args.throughput), args.corpus_segments, args.keep_rate)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.as_dict(), indent=2), encoding="utf-8")
    return 0
