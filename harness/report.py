"""The run's report: metric-by-iteration tables, plots, and a summary for the terminal.

Run as: ``write_report(Path("runs/demo"))`` -> ``report.md``, ``report.html`` and ``plots/*.png``
in the run directory; ``print(summary_table(Path("runs/demo")))`` at the end of a run.

Everything is read from the run directory (eval summaries, stage manifests, gate files), so a
report can be rebuilt at any time, also for a run that is still going or that crashed: whatever
is missing shows as "–". Columns are the models: ``base`` (untuned), ``iter_00`` (M0, seed
only), ``iter_01``, ... A judge number whose evaluator failed its own check is marked "†".
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DASH = "–"
UNTRUSTED = "†"
UNTRUSTED_NOTE = (f"{UNTRUSTED} untrusted: the judge failed its own check (agreement with labels or "
                  "position bias), so gates refuse to compare this number.")
BASE = "base"
WIN_RATES = ("alpaca_eval/win_rate", "alpaca_eval/lc_win_rate")
SCORES = ("1", "2", "3", "4", "5", "unscored")
_ITER = re.compile(r"^iter_(\d+)$")


@dataclass
class RunView:
    """What the report needs from a run directory, per column (``base``, ``iter_NN``)."""

    root: Path
    columns: list[str]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """column -> stage (curate, select, finetune) -> manifest stats."""
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seed_lengths: dict[str, tuple[float, float]] = field(default_factory=dict)
    """instruction/response -> (mean, std) of the seed pairs' character counts."""
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(stage path, manifest) of every finished stage, in the order they ran."""

    def stat(self, column: str, stage: str, *keys: str) -> Any:
        node: Any = self.stats.get(column, {}).get(stage, {})
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):  # a half-written file must not stop a report
        return None


def _columns(root: Path) -> list[str]:
    found = [p.name for p in root.iterdir() if p.is_dir() and _ITER.match(p.name)] if root.is_dir() else []
    return [BASE] + sorted(found, key=lambda n: int(_ITER.match(n).group(1)))


def _seed_lengths(path: Path) -> dict[str, tuple[float, float]]:
    sizes: dict[str, list[int]] = {"instruction": [], "response": []}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                for key in sizes:
                    sizes[key].append(len(str(row.get(key, ""))))
    return {k: _mean_std(v) for k, v in sizes.items() if v}


def _mean_std(values: list[int]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def load_run(run_dir: Path) -> RunView:
    """Read every piece the report uses; absent files simply leave gaps."""
    root = Path(run_dir)
    view = RunView(root, _columns(root))
    for col in view.columns:
        summary = _json(root / col / "eval" / "summary.json")
        if summary is not None:
            view.evals[col] = summary
        view.stats[col] = {s: (_json(root / col / s / "manifest.json") or {}).get("stats") or {}
                           for s in ("curate", "select", "finetune")}
        gate = _json(root / col / "gate.json")
        if gate is not None:
            view.gates[col] = gate
    try:
        import yaml

        view.config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, ImportError):
        pass
    view.seed_lengths = _seed_lengths(root / "seed" / "data.jsonl")
    view.stages = stage_manifests(root)
    return view


# --------------------------------------------------------------------------- cells


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _decimals(value: float) -> int:
    return 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3


def fmt(value: Any, decimals: int | None = None) -> str:
    """A number as the tables show it; None (or not a number) is "–"."""
    if not _is_number(value):
        return DASH
    if isinstance(value, int) and decimals is None:
        return str(value)
    return f"{value:.{_decimals(value) if decimals is None else decimals}f}"


def plus_minus(value: Any, spread: Any) -> str:
    """``"0.420 ± 0.050"``: the spread with as many decimals as the value; "–" without a value."""
    if not _is_number(value):
        return DASH
    if not _is_number(spread):
        return fmt(value)
    places = _decimals(value)
    return f"{fmt(value, places)} ± {fmt(spread, places)}"


def metric_cell(metric: dict[str, Any] | None) -> str:
    """``"0.420 ± 0.050"``, with "†" when the evaluator is untrusted; "–" when missing."""
    text = plus_minus((metric or {}).get("value"), (metric or {}).get("stderr"))
    if text != DASH and metric.get("trusted") is False:
        text += f" {UNTRUSTED}"
    return text


def _mean_std_cell(stats: dict[str, Any] | None) -> str:
    return plus_minus((stats or {}).get("mean"), (stats or {}).get("std"))


def _histogram_cell(hist: dict[str, Any] | None) -> str:
    if not hist:
        return DASH
    return " ".join(f"{'?' if k == 'unscored' else k}:{hist.get(k, 0)}" for k in SCORES if k in hist)


def _gate_cell(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return DASH
    return "passed" if gate.get("passed") else "FAILED"


Table = tuple[list[str], list[list[str]]]
"""(header, rows): header is ["metric", *columns]; every row has one cell per header entry."""


def metric_table(view: RunView) -> Table:
    """Evaluation metrics (rows, in the evaluator's order) by model (columns)."""
    names: list[str] = []
    for col in view.columns:
        for name in (view.evals.get(col, {}).get("metrics") or {}):
            if name not in names:
                names.append(name)
    rows = [[name] + [metric_cell((view.evals.get(c, {}).get("metrics") or {}).get(name)) for c in view.columns]
            for name in names]
    for key in ("accuracy", "position_bias"):
        cells = [fmt((view.evals.get(c, {}).get("judge_check") or {}).get(key)) for c in view.columns]
        if any(cell != DASH for cell in cells):
            rows.append([f"judge/{key}"] + cells)
    return ["metric"] + view.columns, rows


LC_GLM_NOTES = {
    "length_controlled_minimal": ("alpaca_eval/lc_win_rate: alpaca_eval's length_controlled_minimal GLM "
                                  "(length term only, fit on each model's own annotations; bootstrap "
                                  "standard error), not comparable with leaderboard LC win rates"),
    "length_controlled_v1": "alpaca_eval/lc_win_rate: alpaca_eval 2's length_controlled_v1 GLM",
}


def metric_notes(view: RunView, table: Table) -> list[str]:
    """Footnotes the evaluation table needs: untrusted judges, and which LC GLM made the LC win rates."""
    notes = []
    if any(UNTRUSTED in cell for row in table[1] for cell in row):
        notes.append(UNTRUSTED_NOTE)
    glms = {((view.evals.get(c, {}).get("metrics") or {}).get("alpaca_eval/lc_win_rate") or {})
            .get("provenance", {}).get("lc_glm") for c in view.columns} - {None}
    notes += [LC_GLM_NOTES.get(g, f"alpaca_eval/lc_win_rate: GLM {g}") for g in sorted(glms)]
    return notes


def _data_rows() -> list[tuple[str, Callable[[RunView, str], str]]]:
    def stat(stage: str, *keys: str) -> Callable[[RunView, str], str]:
        return lambda v, c: fmt(v.stat(c, stage, *keys))

    return [
        ("train pairs", stat("finetune", "train_pairs")),
        ("final loss", stat("finetune", "final_loss")),
        ("pairs rated", stat("curate", "pairs")),
        ("score histogram", lambda v, c: _histogram_cell(v.stat(c, "curate", "histogram"))),
        ("unscored rate", stat("curate", "unscored_rate")),
        ("curator precision", stat("select", "curator", "precision")),  # P/R depend on k, so select owns them
        ("curator recall", stat("select", "curator", "recall")),
        ("selected", stat("select", "selected")),
        ("keep rate", stat("select", "keep_rate")),
        ("instruction chars", lambda v, c: _mean_std_cell(v.stat(c, "select", "quality", "instruction_chars"))),
        ("response chars", lambda v, c: _mean_std_cell(v.stat(c, "select", "quality", "response_chars"))),
        ("instruction distinct-2", stat("select", "quality", "instruction_distinct_2")),
        ("near-duplicate rate", stat("select", "quality", "instruction_near_duplicate_rate")),
        ("contaminated", stat("select", "contaminated")),
        ("gate", lambda v, c: _gate_cell(v.gates.get(c))),
    ]


def data_table(view: RunView) -> Table:
    """Curation, selected-data and training numbers by model; the base model has none."""
    return ["", *view.columns], [[label] + [cell(view, c) for c in view.columns] for label, cell in _data_rows()]


def gate_failures(view: RunView) -> list[str]:
    lines = []
    for col, gate in view.gates.items():
        for d in gate.get("decisions") or []:
            if not d.get("passed"):
                lines.append(f"{col}: {d.get('check')}: {d.get('reason')}")
    return lines


# --------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    """A figure on the Agg canvas, without pyplot's global state (safe in threads and servers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_win_rate(view: RunView, path: Path) -> Path | None:
    """AlpacaEval win rate(s) per model with stderr bars; untrusted points drawn hollow."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for offset, name in zip((-0.08, 0.08), WIN_RATES):
        points = [(i, (view.evals.get(c, {}).get("metrics") or {}).get(name)) for i, c in enumerate(view.columns)]
        points = [(i, m) for i, m in points if m and _is_number(m.get("value"))]
        if not points:
            continue
        drawn = True
        xs = [i + offset for i, _ in points]
        ys = [m["value"] for _, m in points]
        errs = [m.get("stderr") or 0.0 for _, m in points]
        bars = ax.errorbar(xs, ys, yerr=errs, fmt="-", capsize=4, label=name)
        colour = bars[0].get_color()
        for x, (_, m) in zip(xs, points):
            hollow = m.get("trusted") is False
            ax.plot([x], [m["value"]], "o", color=colour, markerfacecolor="white" if hollow else colour)
    if not drawn:
        return None
    ax.set_xticks(range(len(view.columns)), view.columns)
    ax.set_ylabel("win rate")
    ax.set_title("AlpacaEval win rate by model (hollow: untrusted judge)")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_score_histograms(view: RunView, path: Path) -> Path | None:
    """Curation scores per iteration, bars grouped by score (``?`` = unscored)."""
    hists = [(c, view.stat(c, "curate", "histogram")) for c in view.columns]
    hists = [(c, h) for c, h in hists if h]
    if not hists:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(hists)
    for j, (col, hist) in enumerate(hists):
        xs = [i + (j - (len(hists) - 1) / 2) * width for i in range(len(SCORES))]
        ax.bar(xs, [hist.get(k, 0) for k in SCORES], width=width, label=col)
    ax.set_xticks(range(len(SCORES)), [("?" if k == "unscored" else k) for k in SCORES])
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of pairs
    ax.set_xlabel("curation score")
    ax.set_ylabel("pairs")
    ax.set_title("Curation score histogram by iteration")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_keep_rate(view: RunView, path: Path) -> Path | None:
    """Share of candidates kept by selection, per iteration."""
    points = [(c, view.stat(c, "select", "keep_rate")) for c in view.columns]
    points = [(c, r) for c, r in points if _is_number(r)]
    if not points:
        return None
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    bars = ax.bar([c for c, _ in points], [r for _, r in points], color="tab:green")
    ax.bar_label(bars, labels=[fmt(r) for _, r in points], fontsize="small")
    ax.set_ylim(0, max(1.0, max(r for _, r in points) * 1.15))
    ax.set_ylabel("keep rate")
    ax.set_title("Selected / candidates by iteration")
    return _save(fig, path)


def plot_lengths(view: RunView, path: Path) -> Path | None:
    """Mean ± std character counts of the seed pairs and of each iteration's selected pairs."""
    fields = ("instruction", "response")
    series: dict[str, list[tuple[str, float, float]]] = {f: [] for f in fields}
    for f in fields:
        if f in view.seed_lengths:
            series[f].append(("seed", *view.seed_lengths[f]))
        for col in view.columns:
            stats = view.stat(col, "select", "quality", f"{f}_chars") or {}
            if _is_number(stats.get("mean")):
                series[f].append((col, stats["mean"], stats.get("std") or 0.0))
    if not any(len([p for p in s if p[0] != "seed"]) for s in series.values()):
        return None
    fig = _figure(8.0, 3.4)
    for k, f in enumerate(fields):
        ax = fig.add_subplot(1, 2, k + 1)
        labels = [p[0] for p in series[f]]
        ax.errorbar(range(len(labels)), [p[1] for p in series[f]], yerr=[p[2] for p in series[f]],
                    fmt="o", capsize=4)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("characters")
        ax.set_title(f"{f} length (seed, then selected pairs)")
    return _save(fig, path)


PLOTS: dict[str, Callable[[RunView, Path], Path | None]] = {
    "win_rate.png": plot_win_rate,
    "score_histograms.png": plot_score_histograms,
    "keep_rate.png": plot_keep_rate,
    "lengths.png": plot_lengths,
}


def write_plots(view: RunView) -> list[Path]:
    """Every plot that has data, under ``<run>/plots/``; a stale one from an earlier call is removed."""
    out = []
    for name, plot in PLOTS.items():
        path = view.root / "plots" / name
        made = plot(view, path)
        if made is None:
            path.unlink(missing_ok=True)
        else:
            out.append(made)
    return out


# --------------------------------------------------------------------------- rendering


def _header_lines(view: RunView) -> list[tuple[str, str]]:
    cfg = view.config
    env = _json(view.root / "env.json") or {}
    items = [
        ("run directory", str(view.root)),
        ("base model", (cfg.get("model") or {}).get("base")),
        ("curation", (cfg.get("curate") or {}).get("mode")),
        ("select.k", (cfg.get("select") or {}).get("k")),
        ("iterations", (cfg.get("iterate") or {}).get("iterations")),
        ("git commit", env.get("git_commit")),
        ("peak memory", peak_memory(view.stages)),
    ]
    return [(k, str(v)) for k, v in items if v is not None]


def stage_manifests(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(stage path, manifest) of every finished stage, in the order the stages ran: the
    manifest's ``started`` (to the second), then when the manifest was written."""
    found = []
    for path in root.glob("**/manifest.json"):
        manifest = _json(path) or {}
        if {"stage", "seconds", "peak_rss_mib"} & set(manifest):
            order = (str(manifest.get("started") or ""), path.stat().st_mtime)
            found.append((order, str(path.parent.relative_to(root)), manifest))
    return [(name, manifest) for _, name, manifest in sorted(found, key=lambda f: (f[0], f[1]))]


def peak_memory(stages: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The highest resident-memory peak any stage recorded, and which stage: ``"1.23 GiB (iter_01/curate)"``."""
    peaks = [(m["peak_rss_mib"], name) for name, m in stages if _is_number(m.get("peak_rss_mib"))]
    if not peaks:
        return None
    peak, name = max(peaks, key=lambda p: p[0])
    text = f"{peak / 1024:.2f} GiB ({name})"
    gpu = [(m["gpu_peak_mib"], name) for name, m in stages if _is_number(m.get("gpu_peak_mib"))]
    if gpu:
        gpu_peak, gpu_name = max(gpu, key=lambda p: p[0])
        text += f"; GPU {gpu_peak / 1024:.2f} GiB ({gpu_name})"
    return text


def stage_table(stages: list[tuple[str, dict[str, Any]]]) -> Table:
    """Each stage's seconds, and its memory peak, at start and after, in GiB, plus its GPU peak
    where any stage used a GPU; "–" where a manifest predates a field."""

    def gib(value: Any) -> str:
        return f"{value / 1024:.2f}" if _is_number(value) else "–"

    gpu = any(_is_number(m.get("gpu_peak_mib")) for _, m in stages)
    rows = [[name, f"{m['seconds']:.1f}" if _is_number(m.get("seconds")) else "–",
             gib(m.get("peak_rss_mib")), gib(m.get("rss_start_mib")), gib(m.get("rss_end_mib"))]
            + ([gib(m.get("gpu_peak_mib"))] if gpu else [])
            for name, m in stages]
    return ["stage", "seconds", "peak GiB", "at start GiB", "after GiB"] + (["GPU peak GiB"] if gpu else []), rows


def _md_table(table: Table) -> list[str]:
    header, rows = table

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |"] + [line(r) for r in rows]


def render_markdown(view: RunView, plots: list[Path]) -> str:
    name = (view.config.get("run") or {}).get("name") or view.root.name
    lines = [f"# Humpback run report: {name}", ""]
    lines += [f"- {k}: `{v}`" for k, v in _header_lines(view)]
    lines += ["", "## Evaluation (value ± stderr)", ""]
    metrics = metric_table(view)
    lines += _md_table(metrics) if metrics[1] else ["No evaluation results yet."]
    for note in metric_notes(view, metrics):
        lines += ["", note]
    lines += ["", "## Curation, selected data and training", ""] + _md_table(data_table(view))
    failures = gate_failures(view)
    lines += ["", "## Gates", ""] + ([f"- {f}" for f in failures] or ["No gate failed."])
    stages = stage_table(view.stages)
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
    name = html.escape(str((view.config.get("run") or {}).get("name") or view.root.name))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Humpback run report: {name}</title>",
             f"<style>{_CSS}</style></head><body><h1>Humpback run report: {name}</h1><ul>"]
    parts += [f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in _header_lines(view)]
    metrics = metric_table(view)
    parts.append("</ul><h2>Evaluation (value ± stderr)</h2>")
    parts.append(_html_table(metrics) if metrics[1] else "<p>No evaluation results yet.</p>")
    parts += [f"<p>{html.escape(note)}</p>" for note in metric_notes(view, metrics)]
    parts.append("<h2>Curation, selected data and training</h2>" + _html_table(data_table(view)))
    failures = gate_failures(view)
    parts.append("<h2>Gates</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failures) + "</ul>"
                 if failures else "<h2>Gates</h2><p>No gate failed.</p>")
    stages = stage_table(view.stages)
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


def summary_table(run_dir: Path) -> str:
    """Both tables as fixed-width text, for the terminal at the end of a run."""
    view = load_run(run_dir)
    metrics = metric_table(view)
    lines = _text_table(metrics) if metrics[1] else ["(no evaluation results yet)"]
    lines += metric_notes(view, metrics)
    lines += [""] + _text_table(data_table(view))
    lines += [f"gate failed: {f}" for f in gate_failures(view)]
    return "\n".join(lines)


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into the run directory.

    Args:
        run_dir: The run directory; any subset of its files may be missing.

    Returns:
        ``markdown`` and ``html`` (paths), ``plots`` (paths of the plots that had data) and
        ``columns`` (the models the tables show).
    """
    view = load_run(Path(run_dir))
    plots = write_plots(view)
    md = view.root / "report.md"
    page = view.root / "report.html"
    md.write_text(render_markdown(view, plots), encoding="utf-8")
    page.write_text(render_html(view, plots), encoding="utf-8")
    return {"markdown": md, "html": page, "plots": plots, "columns": view.columns}
