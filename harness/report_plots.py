"""The report's plots, drawn from a run view into ``<run>/plots/*.png``: win rate by model, curation
score histograms, keep rate, and the lengths of the seed and selected pairs.

Each plot returns None when there is nothing to draw. Figures use the Agg canvas without pyplot,
so drawing is safe in threads and servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.report_tables import SCORES, fmt, is_number, metric_of
from harness.runview import RunView

WIN_RATES = ("alpaca_eval/win_rate", "alpaca_eval/lc_win_rate")


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
        points = [(i, metric_of(m, name)) for i, m in enumerate(view.models.values())]
        points = [(i, m) for i, m in points if m and is_number(m.value)]
        if not points:
            continue
        drawn = True
        xs = [i + offset for i, _ in points]
        ys = [m.value for _, m in points]
        errs = [m.stderr or 0.0 for _, m in points]
        bars = ax.errorbar(xs, ys, yerr=errs, fmt="-", capsize=4, label=name)
        colour = bars[0].get_color()
        for x, (_, m) in zip(xs, points):
            hollow = m.trusted is False
            ax.plot([x], [m.value], "o", color=colour, markerfacecolor="white" if hollow else colour)
    if not drawn:
        return None
    ax.set_xticks(range(len(view.models)), list(view.models))
    ax.set_ylabel("win rate")
    ax.set_title("AlpacaEval win rate by model (hollow: untrusted judge)")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_score_histograms(view: RunView, path: Path) -> Path | None:
    """Curation scores per iteration, bars grouped by score (``?`` = unscored)."""
    hists = [(name, m.curation.histogram) for name, m in view.models.items() if m.curation.histogram]
    if not hists:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(hists)
    for j, (name, hist) in enumerate(hists):
        xs = [i + (j - (len(hists) - 1) / 2) * width for i in range(len(SCORES))]
        ax.bar(xs, [hist.get(k, 0) for k in SCORES], width=width, label=name)
    ax.set_xticks(range(len(SCORES)), [("?" if k == "unscored" else k) for k in SCORES])
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of pairs
    ax.set_xlabel("curation score")
    ax.set_ylabel("pairs")
    ax.set_title("Curation score histogram by iteration")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_keep_rate(view: RunView, path: Path) -> Path | None:
    """Share of candidates kept by selection, per iteration."""
    points = [(name, m.selection.keep_rate) for name, m in view.models.items() if is_number(m.selection.keep_rate)]
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
            seed = view.seed_lengths[f]
            series[f].append(("seed", seed.mean, seed.std))
        for name, m in view.models.items():
            stats = getattr(m.selection, f"{f}_chars")
            if is_number(stats.mean):
                series[f].append((name, stats.mean, stats.std or 0.0))
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
