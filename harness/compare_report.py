"""``humpback compare``'s output: the table as text (terminal), Markdown and JSON, and the runs
mirrored into one MLflow experiment so that its compare view shows them side by side.

Run as: ``write_comparison(compare_runs([...]), Path("runs/compare"))``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.compare import Cell, Comparison
from harness.report_tables import DASH, UNTRUSTED, fmt, is_number, plus_minus

log = logging.getLogger(__name__)

MARKDOWN = "compare.md"
JSON = "compare.json"
UNPAIRED = "ᵘ"
NOTED = "‡"
UNTRUSTED_NOTE = (f"{UNTRUSTED} untrusted evaluator: the judge did not beat always-choosing-the-longer-answer on "
                  "human-labelled pairs (judge/minus_longer in the run's report); these numbers and their "
                  "differences are shown, not to be relied on.")

Table = tuple[list[str], list[list[str]]]


# --------------------------------------------------------------------------- cells


def _places(value: float) -> int:
    return 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3


def _signed(value: float, places: int) -> str:
    return f"{value:+.{places}f}"


def difference_text(cell: Cell, reasons: list[str]) -> str:
    """``"+0.050 [-0.100, 0.200]"`` (with markers), ``"baseline"``, or ``"n/c[1]"`` with the
    reason appended to ``reasons`` (numbered once per distinct text)."""
    if cell.signal == "baseline":
        return "baseline"
    if cell.paired is None:
        if cell.why_not is None:
            return DASH
        if cell.why_not not in reasons:
            reasons.append(cell.why_not)
        return f"n/c[{reasons.index(cell.why_not) + 1}]"
    p = cell.paired
    places = _places(max(abs(p.low), abs(p.high), abs(p.estimate)) or 1.0)
    text = f"{_signed(p.estimate, places)} [{_signed(p.low, places)}, {_signed(p.high, places)}]"
    if cell.signal and cell.signal.startswith("unpaired"):
        text += UNPAIRED
    if cell.note:
        text += NOTED
    if not cell.trusted:
        text += f" {UNTRUSTED}"
    return text


def value_text(cell: Cell) -> str:
    """``"0.250 ± 0.217"`` (value ± standard error), dagger when the evaluator is untrusted."""
    m = cell.metric
    if m is None or m.value is None:
        return DASH
    text = plus_minus(m.value, m.stderr)
    return text + f" {UNTRUSTED}" if m.trusted is False else text


def _header(comparison: Comparison) -> list[str]:
    lower = {m for e in comparison.entries for m, v in e.metrics.items() if v.higher_is_better is False}
    return ["run/model", *(f"{m} (lower is better)" if m in lower else m for m in comparison.metrics)]


def table(comparison: Comparison, reasons: list[str]) -> Table:
    """Rows = models, columns = metrics; each cell ``value ± se`` and ``Δ difference [interval]``."""
    rows = []
    for entry in comparison.entries:
        cells = [comparison.cell(entry, m) for m in comparison.metrics]
        rows.append([entry.label] + [f"{value_text(c)}; Δ {difference_text(c, reasons)}" for c in cells])
    return _header(comparison), rows


def mde_table(comparison: Comparison) -> Table:
    """The smallest difference each comparison could have detected (at the table's level and power)."""
    rows = []
    for entry in comparison.entries[1:]:
        cells = []
        for m in comparison.metrics:
            p = comparison.cell(entry, m).paired
            cells.append(DASH if p is None else f"{fmt(p.mde)} (n={p.n}, {p.method})")
        rows.append([entry.label] + cells)
    return _header(comparison), rows


def notes(comparison: Comparison, reasons: list[str]) -> list[str]:
    base = comparison.baseline.label
    lines = [f"Baseline: {base}. Each cell: the value ± its standard error; Δ the mean per-item difference from "
             f"the baseline on the same items, with its {comparison.corrected:.2%} interval"
             + (f" (Bonferroni: {comparison.comparisons} differences hold together at {comparison.level:.0%})"
                if comparison.corrected != comparison.level else "") + "."]
    cells = [comparison.cell(e, m) for e in comparison.entries for m in comparison.metrics]
    if any(c.signal and c.signal.startswith("unpaired") for c in cells):
        lines.append(f"{UNPAIRED} unpaired: no per-item scores for this metric, so the difference is taken from the "
                     f"two standard errors as if independent (wider than a paired interval).")
    for note in dict.fromkeys(c.note for c in cells if c.note):
        lines.append(f"{NOTED} {note}.")
    if any(not c.trusted for c in cells):
        lines.append(UNTRUSTED_NOTE)
    lines += [f"n/c[{i}] not compared: {why}." for i, why in enumerate(reasons, 1)]
    lines += [f"skipped: {s}" for s in comparison.skipped]
    return lines


# --------------------------------------------------------------------------- formats


def text_table(tab: Table) -> list[str]:
    header, rows = tab
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def md_table(tab: Table) -> list[str]:
    header, rows = tab
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return [line(header), "| " + " | ".join("---" for _ in header) + " |"] + [line(r) for r in rows]


def render_text(comparison: Comparison) -> str:
    reasons: list[str] = []
    main = text_table(table(comparison, reasons))
    lines = main + [""] + notes(comparison, reasons)
    if len(comparison.entries) > 1:
        lines += ["", f"Smallest detectable difference ({comparison.power:.0%} power, same level):"]
        lines += text_table(mde_table(comparison))
    return "\n".join(lines)


def render_markdown(comparison: Comparison) -> str:
    reasons: list[str] = []
    main = md_table(table(comparison, reasons))
    lines = ["# Comparison of runs", "", "| run | directory | tags |", "| --- | --- | --- |"]
    seen = set()
    for e in comparison.entries:
        if e.run not in seen:
            seen.add(e.run)
            tags = ", ".join(f"{k}={v}" for k, v in e.tags.items()) or DASH
            lines.append(f"| {e.run} | `{e.run_dir}` | {tags} |")
    lines += ["", *main, "", *(f"- {n}" for n in notes(comparison, reasons))]
    if len(comparison.entries) > 1:
        lines += ["", f"## Smallest detectable difference ({comparison.power:.0%} power)", "",
                  *md_table(mde_table(comparison))]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> Any:
    return round(value, 6) if is_number(value) and isinstance(value, float) else value


def as_json(comparison: Comparison) -> dict[str, Any]:
    rows = []
    for e in comparison.entries:
        cells = {}
        for m in comparison.metrics:
            c = comparison.cell(e, m)
            metric = c.metric
            cells[m] = {
                "value": _number(metric.value) if metric else None,
                "stderr": _number(metric.stderr) if metric else None,
                "n": metric.n if metric else None,
                "higher_is_better": metric.higher_is_better if metric else None,
                "trusted": c.trusted,
                "difference": c.paired.as_dict() if c.paired else None,
                "signal": c.signal, "note": c.note, "why_not": c.why_not,
            }
        rows.append({"label": e.label, "run": e.run, "run_dir": str(e.run_dir), "model": e.model, "tags": e.tags,
                     "cells": cells})
    return {"baseline": comparison.baseline.label, "metrics": comparison.metrics, "level": comparison.level,
            "interval_level": round(comparison.corrected, 6), "comparisons": comparison.comparisons,
            "power": comparison.power, "rows": rows, "skipped": comparison.skipped}


def write_comparison(comparison: Comparison, out: Path) -> list[Path]:
    """``compare.md`` and ``compare.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / MARKDOWN, out / JSON
    md.write_text(render_markdown(comparison), encoding="utf-8")
    js.write_text(json.dumps(as_json(comparison), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [md, js]


# --------------------------------------------------------------------------- MLflow


def mlflow_experiment(comparison: Comparison) -> str:
    """The runs' own experiment when they all name the same one (the ablation configs do), else
    ``humpback/compare``."""
    names = {(e.config.get("tracking") or {}).get("experiment") for e in comparison.entries}
    return names.pop() if len(names) == 1 and None not in names else "humpback/compare"


def log_to_mlflow(comparison: Comparison, experiment: str | None = None, tracking_uri: str | None = None) -> dict:
    """Each run as a parent run in one experiment (found again by its tags when already there),
    with its ``run.tags``; returns run name -> parent run id (runs configured with tracking off
    are left out)."""
    from harness import tracking

    experiment = experiment or mlflow_experiment(comparison)
    ids: dict[str, str] = {}
    for entry in {e.run: e for e in comparison.entries}.values():
        uri = tracking_uri or (entry.config.get("tracking") or {}).get("uri")
        if isinstance(uri, str) and uri.lower() == "off" or uri is False:
            log.info("%s: tracking.uri is off, not logged to MLflow", entry.run)
            continue
        result = tracking.log_run(entry.run_dir, tracking_uri=uri, experiment=experiment, register_model_name=None)
        ids[entry.run] = result["parent_run_id"]
    return ids
