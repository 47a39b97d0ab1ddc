"""Markdown tables of calibration results, for the command line and the run report."""

from __future__ import annotations

from typing import Any

GROUP_TITLES = {
    "human": "human labels, all",
    "llmbar_natural": "LLMBar Natural (human)",
    "llmbar_mtbench": "MT-Bench experts (human)",
    "alpaca_eval_gpt4": "AlpacaEval, agreement with GPT-4",
}


def _ci(m: dict[str, Any] | None, signed: bool = False) -> str:
    if not m or m.get("value") is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if m.get("low") is None:
        return fmt.format(m["value"])
    return f"{fmt.format(m['value'])} [{fmt.format(m['low'])}, {fmt.format(m['high'])}]"


def _diff(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return ""
    if d.get("low") is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


JUDGE_HEADER = ["pairs", "judge", "n", "accuracy", "one order", "consistency", "position bias", "length bias",
                "judge minus this"]


def judge_rows(result: dict[str, Any], mark: str = "**") -> list[list[str]]:
    """One row per group and judge: accuracy, single-order accuracy, order consistency,
    position and length bias (95% intervals), and the judge's paired difference from each
    trivial judge (the judge under test marked with ``mark``)."""
    subject = result["subject"]
    rows = []
    for group, row in result["groups"].items():
        for name, m in row["judges"].items():
            label = f"{mark}{name}{mark}" if name == subject else name
            rows.append([GROUP_TITLES.get(group, group), label, str(m["n_pairs"]), _ci(m["accuracy"]),
                         _ci(m["single_order_accuracy"]), _ci(m["order_consistency"]),
                         _ci(m["position_bias"], True), _ci(m["length_bias"], True), _diff(row["vs"].get(name))])
    return rows


def judge_table(result: dict[str, Any]) -> str:
    """:func:`judge_rows` as a Markdown table."""
    lines = ["| " + " | ".join(JUDGE_HEADER) + " |", "|---|---|---:|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in judge_rows(result)]
    return "\n".join(lines)


def curator_table(result: dict[str, Any]) -> str:
    """One row per group and rater: pairwise accuracy with its interval and the paired
    difference from always-longer; then the rank correlation with GPT-4 across models."""
    subject = result["subject"]
    lines = ["| pairs | rater | n | pairwise accuracy | unscored | curator minus this |", "|---|---|---:|---|---:|---|"]
    for group, row in result["groups"].items():
        for name, m in row["raters"].items():
            label = f"**{name}**" if name == subject else name
            lines.append(f"| {GROUP_TITLES.get(group, group)} | {label} | {m['n_pairs']} | {_ci(m['accuracy'])} | "
                         f"{m.get('unscored', 0)} | {_diff(row['vs'].get(name))} |")
    rank = result.get("rank_correlation")
    if rank:
        lines.append("")
        lines.append(f"Spearman correlation across the {len(rank['models'])} AlpacaEval models of the curator's mean "
                     f"rating with GPT-4's win rate: {_ci(rank['spearman'], True)} ({rank['prompts']} prompts each).")
        lines.append("")
        lines.append("| model | GPT-4 win rate | mean curator rating |")
        lines.append("|---|---:|---:|")
        for model, (gpt4, mean) in rank["models"].items():
            lines.append(f"| {model} | {gpt4:.3f} | {'-' if mean is None else f'{mean:.3f}'} |")
    return "\n".join(lines)
