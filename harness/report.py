"""The run's report: ``report.md``, a self-contained ``report.html``, ``plots/*.png``, and the same
tables as fixed-width text for the terminal.

Run as: ``write_report(Path("runs/demo"))`` -> ``report.md``, ``report.html`` and ``plots/*.png``
in the run directory; ``print(summary_table(Path("runs/demo")))`` at the end of a run.

Everything comes from the run view (:mod:`harness.runview`), so a report can be rebuilt at any
time, also for a run that is still going or that crashed: whatever is missing shows as "–". The
tables are built in :mod:`harness.report_tables`, the plots drawn in :mod:`harness.report_plots`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from harness.report_plots import write_plots
from harness.report_tables import (LC_GLM_NOTES, Table, data_table, gate_failures, gate_stops, gate_table,
                                   head_to_head_table, metric_cell, metric_notes,
                                   metric_table, peak_memory, stage_table, unfiltered_curations)
from harness.runview import RunView, as_view
from pipeline import faults
from pipeline.io import write_text_atomic

__all__ = ["LC_GLM_NOTES", "metric_cell", "peak_memory", "render_html", "render_markdown", "stage_table",
           "summary_table", "write_report"]


def _header_lines(view: RunView) -> list[tuple[str, str]]:
    cfg = view.config
    items = [
        ("run directory", str(view.root)),
        ("base model", (cfg.get("model") or {}).get("base")),
        ("curation", (cfg.get("curate") or {}).get("mode")),
        ("select.k", (cfg.get("select") or {}).get("k")),
        ("AlpacaEval judge", _judge_line(cfg)),
        ("iterations", (cfg.get("iterate") or {}).get("iterations")),
        ("git commit", view.git_commit),
        ("peak memory", peak_memory(view.stages_in_order())),
    ]
    return [(k, str(v)) for k, v in items if v is not None]


def _judge_line(cfg: dict[str, Any]) -> str | None:
    ev = cfg.get("eval") or {}
    if not ev.get("judge"):
        return None
    model = ev.get("judge_model") or (cfg.get("model") or {}).get("base")
    return f"{ev['judge']} ({model})" if model else ev["judge"]


def _md_table(table: Table) -> list[str]:
    header, rows = table

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |"] + [line(r) for r in rows]


def _calibration_table(view: RunView) -> Table:
    """The judge and the trivial judges on each group of labelled pairs (judge_check/calibration.json)."""
    from evals.calibration.tables import JUDGE_HEADER, judge_rows

    return JUDGE_HEADER, judge_rows(view.judge_calibration, mark="")


H2H_NOTE = "the judge saw both models' answers to the same prompts; 50 = no difference"
GATE_NOTE = ("Each gated metric, item by item against its baseline: the change (this model minus the baseline, "
             "in the metric's units; head to head: win rate minus 50) with its interval at the level shown "
             "(corrected for the number of gated metrics). Regression: the whole interval beyond the tolerance; "
             "inconclusive: it straddles the tolerance. MDE: the smallest change this n would find with the power gate.power sets (80% by default); "
             "blind: the MDE exceeds the tolerance, with the n that would see it.")


def render_markdown(view: RunView, plots: list[Path]) -> str:
    lines = [f"# Humpback run report: {view.name}", ""]
    lines += [f"- {k}: `{v}`" for k, v in _header_lines(view)]
    lines += ["", "## Evaluation (value ± stderr)", ""]
    metrics = metric_table(view)
    lines += _md_table(metrics) if metrics[1] else ["No evaluation results yet."]
    for note in metric_notes(view, metrics):
        lines += ["", note]
    if view.judge_calibration:
        lines += ["", "## Judge calibration (outside labels, 95% intervals)", "",
                  view.judge_calibration["verdict"], ""] + _md_table(_calibration_table(view))
    lines += ["", "## Curation, selected data and training", ""] + _md_table(data_table(view))
    h2h = head_to_head_table(view)
    if h2h[1]:
        lines += ["", f"## Head to head ({H2H_NOTE})", ""] + _md_table(h2h)
    failures = gate_failures(view)
    lines += ["", "## Gates", ""] + ([f"- {f}" for f in failures] or ["No gate failed."])
    lines += [f"- {f}" for f in gate_stops(view)]
    lines += [f"- {f}" for f in unfiltered_curations(view)]
    gates = gate_table(view)
    if gates[1]:
        lines += ["", GATE_NOTE, ""] + _md_table(gates)
    stages = stage_table(view.stages_in_order())
    if stages[1]:
        lines += ["", "## Stages (time and resident memory)", ""] + _md_table(stages)
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["No plots yet (nothing to draw)."]
    return "\n".join(lines) + "\n"


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}")


def render_html(view: RunView, plots: list[Path]) -> str:
    """The same content as the Markdown, with the plots embedded (one file to share)."""
    name = html.escape(str(view.name))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Humpback run report: {name}</title>",
             f"<style>{_CSS}</style></head><body><h1>Humpback run report: {name}</h1><ul>"]
    parts += [f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in _header_lines(view)]
    metrics = metric_table(view)
    parts.append("</ul><h2>Evaluation (value ± stderr)</h2>")
    parts.append(_html_table(metrics) if metrics[1] else "<p>No evaluation results yet.</p>")
    parts += [f"<p>{html.escape(note)}</p>" for note in metric_notes(view, metrics)]
    if view.judge_calibration:
        parts.append("<h2>Judge calibration (outside labels, 95% intervals)</h2>"
                     f"<p>{html.escape(view.judge_calibration['verdict'])}</p>" + _html_table(_calibration_table(view)))
    parts.append("<h2>Curation, selected data and training</h2>" + _html_table(data_table(view)))
    h2h = head_to_head_table(view)
    if h2h[1]:
        parts.append(f"<h2>Head to head ({html.escape(H2H_NOTE)})</h2>" + _html_table(h2h))
    failures = gate_failures(view)
    parts.append("<h2>Gates</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failures) + "</ul>"
                 if failures else "<h2>Gates</h2><p>No gate failed.</p>")
    stops = gate_stops(view) + unfiltered_curations(view)
    if stops:
        parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in stops) + "</ul>")
    gates = gate_table(view)
    if gates[1]:
        parts.append(f"<p>{html.escape(GATE_NOTE)}</p>" + _html_table(gates))
    stages = stage_table(view.stages_in_order())
    if stages[1]:
        parts.append("<h2>Stages (time and resident memory)</h2>" + _html_table(stages))
    parts.append("<h2>Plots</h2>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>")
    if not plots:
        parts.append("<p>No plots yet (nothing to draw).</p>")
    return "".join(parts) + "</body></html>\n"


def _text_table(table: Table) -> list[str]:
    header, rows = table
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def summary_table(run: Path | RunView) -> str:
    """Both tables as fixed-width text, for the terminal at the end of a run."""
    view = as_view(run)
    metrics = metric_table(view)
    lines = _text_table(metrics) if metrics[1] else ["(no evaluation results yet)"]
    lines += metric_notes(view, metrics)
    lines += [""] + _text_table(data_table(view))
    lines += [f"gate failed: {f}" for f in gate_failures(view)]
    lines += [f"loop ended: {f}" for f in gate_stops(view)]
    lines += [f"curation filtered nothing: {f}" for f in unfiltered_curations(view)]
    return "\n".join(lines)


def write_report(run: Path | RunView) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into the run directory.

    Args:
        run: The run directory (any subset of its files may be missing), or its view.

    Returns:
        ``markdown`` and ``html`` (paths), ``plots`` (paths of the plots that had data) and
        ``columns`` (the models the tables show).
    """
    view = as_view(run)
    plots = write_plots(view)
    faults.checkpoint("report.plots")
    md = view.root / "report.md"
    page = view.root / "report.html"
    write_text_atomic(md, render_markdown(view, plots))  # never a truncated report (disk full, crash)
    faults.checkpoint("report.markdown", md)
    write_text_atomic(page, render_html(view, plots))
    return {"markdown": md, "html": page, "plots": plots, "columns": list(view.models)}
