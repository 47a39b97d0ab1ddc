"""From timed rounds to the results JSON and the printed table (pure Python, no torch).

A workload entry holds the per-round samples and the derived numbers: median throughput,
achieved GFLOP/s, MFU against the measured peak of the workload's dtype, and the
machine-normalized throughput that ``benchmarks.check`` compares with the baseline.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

SCHEMA = "humpback-bench/1"

# The project's speed targets, evaluated in every full run's table.
TARGET_BATCHED_VS_NAIVE = 20.0
TARGET_MFU = 0.25
TARGET_LOGPROB_VS_GENERATE = 10.0
TARGET_LORA_BF16_VS_FP32 = 2.0
LOSS_CURVE_TOLERANCE = 0.05
"""bf16 and fp32 loss curves count as equal when no step differs by more than 5% (relative):
bf16 keeps about 3 significant digits, and over a few LoRA steps that moves the loss by well
under 1% unless something is broken (a wrong cast, overflow, a lost gradient)."""

BUSY_LIMIT = 0.10
"""Same as ``benchmarks.measure.BUSY_LIMIT`` (kept here so this module needs no torch)."""

UNITS = {"new_tokens": "new tok/s", "tokens": "tok/s", "items": "pairs/s"}
NORM_UNITS = {"new_tokens": "new tok/GFLOP", "tokens": "tok/GFLOP", "items": "pairs/GFLOP"}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def sig(x: float, digits: int = 6) -> float:
    """``x`` to significant digits: curation's pairs per GFLOP are around 0.002."""
    return float(f"{x:.{digits}g}")


def workload_entry(
    *, path: str, counts: str, dtype: str, rounds: Iterable[Any], parameters: int,
    peaks: dict[str, dict], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON entry of one workload.

    Args:
        path: what ran, in words (engine, batch size, dtype, sizes).
        counts: what throughput counts: ``new_tokens`` (generation), ``tokens`` (training:
            every non-padding token) or ``items`` (curation: pairs).
        dtype: compute dtype (``bf16`` or ``fp32``): selects the peak for MFU and normalization.
        rounds: the timed rounds (``benchmarks.workloads.Round``), warm-up excluded.
        parameters: the model's parameter count, for ``2 * P * tokens`` FLOPs.
        peaks: ``{"bf16": {"gflops": ...}, "fp32": {...}}`` as measured this session.
        extra: anything else worth keeping (e.g. scores, losses).
    """
    rounds = list(rounds)
    peak = peaks[dtype]["gflops"]
    through = [_count(r, counts) / r.seconds for r in rounds]
    achieved = [2.0 * parameters * r.tokens / r.seconds / 1e9 for r in rounds]
    med = statistics.median(through)
    med_gflops = statistics.median(achieved)
    return {
        "path": path,
        "counts": counts,
        "unit": UNITS[counts],
        "dtype": dtype,
        "rounds": len(rounds),
        "throughput": _round(med, 3),
        "samples": [_round(x, 3) for x in through],
        "seconds": [_round(r.seconds, 3) for r in rounds],
        "items_per_round": rounds[0].items,
        "prompt_tokens_per_round": rounds[0].prompt_tokens,
        "new_tokens_per_round": rounds[0].new_tokens,
        "achieved_gflops": _round(med_gflops, 2),
        "peak_gflops": peak,
        "mfu": _round(med_gflops / peak, 4),
        "mfu_vs_bf16_peak": _round(med_gflops / peaks["bf16"]["gflops"], 4),
        "normalized": sig(med / peak),
        "normalized_unit": NORM_UNITS[counts],
        "spread": _round((max(through) - min(through)) / med if med else 0.0, 4),
        **_busy(rounds),
        **({"extra": extra} if extra else {}),
    }


def _busy(rounds: list[Any]) -> dict[str, Any]:
    """Other processes' CPU share over the rounds (median), and whether that disturbed the
    result: the check calls a disturbed workload's drop inconclusive instead of a regression."""
    shares = [r.busy for r in rounds if getattr(r, "busy", None) is not None]
    if not shares:
        return {"busy": None, "disturbed": False, "retried_rounds": 0}
    busy = statistics.median(shares)
    return {"busy": round(busy, 4), "disturbed": busy > BUSY_LIMIT,
            "retried_rounds": sum(getattr(r, "attempts", 1) > 1 for r in rounds)}


def _count(r: Any, counts: str) -> int:
    return {"new_tokens": r.new_tokens, "tokens": r.tokens, "items": r.items}[counts]


def _ratio(results: dict, a: str, b: str) -> float | None:
    wl = results["workloads"]
    if a not in wl or b not in wl or not wl[b]["throughput"]:
        return None
    return round(wl[a]["throughput"] / wl[b]["throughput"], 3)


def ratios(results: dict) -> dict[str, Any]:
    """The comparisons the issue asks for, from the workloads present (None when a side is missing)."""
    wl = results["workloads"]
    out: dict[str, Any] = {
        "answer_batched_vs_naive": _ratio(results, "answer", "naive_answer"),
        "augment_batched_vs_naive": _ratio(results, "augment", "naive_augment"),
        "logprob_vs_generate_curation": _ratio(results, "curate_logprob", "curate_generate"),
        "lora_bf16_vs_fp32": _ratio(results, "lora_bf16", "lora_fp32"),
    }
    if "curate_logprob" in wl and "curate_generate" in wl:
        out["curation_rank_agreement"] = results.get("curation_agreement")
    if "lora_bf16" in wl and "lora_fp32" in wl:
        out["lora_loss_curves"] = results.get("lora_loss_difference")
    if "llama_cpp_answer" in wl:
        out["answer_engine_vs_llama_cpp"] = _ratio(results, "answer", "llama_cpp_answer")
    if "answer_hf_generate" in wl:
        out["answer_engine_vs_hf_generate"] = _ratio(results, "answer", "answer_hf_generate")
    if "vllm_answer" in wl:
        out["answer_engine_vs_vllm"] = _ratio(results, "answer", "vllm_answer")
    if "vllm_augment" in wl:
        out["augment_engine_vs_vllm"] = _ratio(results, "augment", "vllm_augment")
    return out


def targets(results: dict) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met (None: not measured)."""
    r = results["ratios"]
    wl = results["workloads"]
    rows = [_target("batched engine vs naive fp32 loop (answer, new tok/s)", r.get("answer_batched_vs_naive"),
                    TARGET_BATCHED_VS_NAIVE, "x")]
    for name in ("augment", "answer", "curate_generate", "curate_logprob"):
        if name in wl:
            rows.append(_target(f"MFU vs bf16 peak: {name}", wl[name]["mfu_vs_bf16_peak"], TARGET_MFU, "%"))
    rows.append(_target("logprob vs generative curation (pairs/s)", r.get("logprob_vs_generate_curation"),
                        TARGET_LOGPROB_VS_GENERATE, "x"))
    loss = r.get("lora_loss_curves") or {}
    lora = _target("LoRA bf16 vs fp32 (tok/s)", r.get("lora_bf16_vs_fp32"), TARGET_LORA_BF16_VS_FP32, "x")
    if loss:
        lora["loss_max_rel_diff"] = loss.get("max_rel")
        lora["loss_equal"] = loss.get("max_rel") is not None and loss["max_rel"] <= LOSS_CURVE_TOLERANCE
        lora["met"] = bool(lora["met"]) and lora["loss_equal"]
    rows.append(lora)
    llama = r.get("answer_engine_vs_llama_cpp")
    row = _target("engine vs llama.cpp (answer, new tok/s)", llama, 1.0, "x")
    if llama is None:
        row["note"] = "llama.cpp not available: " + results.get("unavailable", {}).get("llama_cpp", "not measured")
    rows.append(row)
    # Below 1, vLLM is the faster engine on this hardware and should be engine.backend's default here.
    vllm = r.get("answer_engine_vs_vllm")
    row = _target("engine vs vLLM (answer, new tok/s)", vllm, 1.0, "x")
    if vllm is None:
        row["note"] = "vLLM not available: " + results.get("unavailable", {}).get("vllm", "not measured")
    rows.append(row)
    return rows


def _target(name: str, value: float | None, threshold: float, kind: str) -> dict[str, Any]:
    return {"target": name, "value": value, "threshold": threshold, "kind": kind,
            "met": None if value is None else value >= threshold}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _fmt_target(row: dict) -> str:
    value, thr = row["value"], row["threshold"]
    if row["kind"] == "%":
        shown, want = _fmt(None if value is None else value * 100, ".1f", "%"), f">= {thr * 100:.0f}%"
    else:
        shown, want = _fmt(value, ".2f", "x"), f">= {thr:g}x"
    verdict = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
    line = f"  {row['target']:<52} {shown:>10}   target {want:<8} {verdict}"
    if "loss_max_rel_diff" in row:
        line += (f" (loss curves max rel diff {_fmt(row['loss_max_rel_diff'] * 100, '.2f', '%')}, "
                 f"tolerance {LOSS_CURVE_TOLERANCE * 100:.0f}%)")
    if row.get("note"):
        line += f" ({row['note']})"
    return line


def format_table(results: dict) -> str:
    """The human-readable summary printed at the end of a benchmark session."""
    m, peaks = results["machine"], results["peaks"]
    lines = [
        f"humpback benchmarks, profile {results['profile']}: {results['model']['name']} "
        f"({results['model']['parameters'] / 1e6:.1f}M parameters), {m['cpu']}, {m['threads']} threads, "
        f"torch {m['torch']}",
        f"measured peaks ({peaks['bf16']['size']}x{peaks['bf16']['size']} matmul, the higher of two medians of "
        f"{len(peaks['bf16']['samples']) // 2}, at the session's start and end): bf16 {peaks['bf16']['gflops']:.1f} GFLOP/s, "
        f"fp32 {peaks['fp32']['gflops']:.1f} GFLOP/s",
        "",
        f"{'workload':<20} {'dtype':<5} {'throughput':>20} {'GFLOP/s':>8} {'MFU':>6} {'normalized':>24} "
        f"{'rounds':>6} {'spread':>6} {'busy':>5}",
    ]
    for name, w in results["workloads"].items():
        lines.append(
            f"{name:<20} {w['dtype']:<5} {w['throughput']:>10.1f} {w['unit']:<9} {w['achieved_gflops']:>8.1f} "
            f"{w['mfu'] * 100:>5.1f}% {w['normalized']:>#10.4g} {w['normalized_unit']:<13} {w['rounds']:>6} "
            f"{w['spread'] * 100:>5.0f}% {_fmt_busy(w)}"
        )
    for name, why in results.get("unavailable", {}).items():
        lines.append(f"{name:<20} not available: {why}")
    lines += ["", "paths:"]
    lines += [f"  {name:<20} {w['path']}" for name, w in results["workloads"].items()]
    lines += ["", "ratios:"] + _ratio_lines(results["ratios"])
    if results.get("targets"):
        lines += ["", "targets:"] + [_fmt_target(t) for t in results["targets"]]
    lines += ["", "MFU = 2 x parameters x (prompt + generated tokens) / seconds / measured peak of the "
              "workload's dtype; normalized = throughput / measured peak GFLOP/s; busy = share of the "
              f"machine's CPU other processes used during the rounds (median; '!' above {BUSY_LIMIT:.0%}: disturbed)."]
    return "\n".join(lines)


def _fmt_busy(w: dict) -> str:
    if w.get("busy") is None:
        return "  n/a"
    return f"{w['busy'] * 100:>4.0f}%" + ("!" if w.get("disturbed") else "")


def _ratio_lines(r: dict) -> list[str]:
    lines = []
    labels = {
        "answer_batched_vs_naive": "answer: batched engine vs naive fp32 loop",
        "augment_batched_vs_naive": "augment: batched engine vs naive fp32 loop",
        "logprob_vs_generate_curation": "curation: logprob vs generate (pairs/s)",
        "lora_bf16_vs_fp32": "LoRA step: bf16 (bf16 base, autocast) vs fp32 (tok/s)",
        "answer_engine_vs_llama_cpp": "answer: engine vs llama.cpp",
        "answer_engine_vs_hf_generate": "answer: engine vs transformers generate",
        "answer_engine_vs_vllm": "answer: engine vs vLLM (same prompts)",
        "augment_engine_vs_vllm": "augment: engine vs vLLM (same prompts)",
    }
    for key, label in labels.items():
        if key in r:
            lines.append(f"  {label:<46} {_fmt(r[key], '.2f', 'x')}")
    agree = r.get("curation_rank_agreement")
    if agree:
        lines.append(f"  {'curation: Spearman(logprob, generate scores)':<46} {_fmt(agree.get('spearman'), '.3f')} "
                     f"on {agree['scored_by_both']} of {agree['pairs']} pairs scored by both modes "
                     f"(generate left {agree['unscored_generate']} unscored)")
    loss = r.get("lora_loss_curves")
    if loss:
        lines.append(f"  {'LoRA loss curves, bf16 vs fp32':<46} max |diff| {loss['max_abs']:.4f} "
                     f"(max rel {loss['max_rel'] * 100:.2f}%, mean |diff| {loss['mean_abs']:.4f}) over "
                     f"{loss['steps']} steps; final loss fp32 {_fmt(loss['final_a'], '.4f')}, "
                     f"bf16 {_fmt(loss['final_b'], '.4f')}")
    return lines
