"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot: no global state, no display).

Each function takes plain data (model labels, metric dicts from summary.json, lengths) and returns
a Figure, or None when there is nothing to draw. Bars and points carry their metric's 95% interval
as whiskers (its ci_method: Wilson for rates, bootstrap for means); every figure colours a model the
same way.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from rtune.io import atomic_path
from rtune.report.tables import metric_title

WIDTH = 11.0  # inches; at DPI this fits a report page without scaling text down much
DPI = 110
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD"]


def model_colors(models: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def save_png(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _point(m: dict, scale: float) -> tuple[float, float, float]:
    """(value, distance down to the interval's low end, distance up to its high end), in plot units."""
    value = m["value"] * scale
    if not m.get("ci"):
        return value, 0.0, 0.0
    low, high = m["ci"][0] * scale, m["ci"][1] * scale
    return value, max(0.0, value - low), max(0.0, high - value)


def _title(name: str, per_model: dict[str, dict], width: int = 40) -> str:
    # Labels from rtune eval run long ("answered (ends, neither echoes nor ...)"): wrap, don't shrink.
    title = metric_title(name, next(iter(per_model.values())))
    # A no-break space keeps the ↑/↓ on the label's last line.
    return textwrap.fill(title.replace(" ↑", "\u00a0↑").replace(" ↓", "\u00a0↓"), width)


def _kind(per_model: dict[str, dict]) -> str:
    return next(iter(per_model.values())).get("kind", "mean")


def _model_ticks(ax, labels: list[str]) -> None:
    # Long or many labels are slanted so neighbours never overlap.
    slant = len(labels) > 4 or max(len(s) for s in labels) > 10
    ax.set_xticks(range(len(labels)), labels, rotation=40 if slant else 0, ha="right" if slant else "center",
                  rotation_mode="anchor")


def _legend(fig: Figure, models: list[str], colors: dict[str, str]) -> None:
    handles = [Patch(color=colors[m], label=m) for m in models]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(models), 5), frameon=False)


def metrics_figure(bench: str, models: list[str], metrics: list[tuple[str, dict[str, dict]]],
                   colors: dict[str, str]) -> Figure | None:
    """Models side by side for every metric of one benchmark.

    metrics: [(name, {model: metric dict})]. Rates share one panel on a 0-100% axis (horizontal
    bars, so long labels stay readable); each mean gets a small panel of its own, since lengths,
    distinct-n and NLL live on unrelated scales.
    """
    rates = [(n, per) for n, per in metrics if _kind(per) == "rate"]
    means = [(n, per) for n, per in metrics if _kind(per) != "rate"]
    if not rates and not means:
        return None
    cols = 3  # one mean alone keeps a third of the width, not a stretched panel
    mean_rows = math.ceil(len(means) / cols)
    heights = ([0.9 + len(rates) * (0.18 * len(models) + 0.25)] if rates else []) + ([2.9 * mean_rows] if means else [])
    fig = Figure(figsize=(WIDTH, sum(heights) + 1.0), layout="constrained")
    fig.suptitle(f"{bench}: metrics per model (whiskers: 95% intervals, Wilson for rates, bootstrap for means)",
                 fontsize=13)
    # Separate subfigures, so the rates' long labels don't push the mean panels aside.
    parts = list(fig.subfigures(len(heights), 1, height_ratios=heights)) if len(heights) > 1 else [fig]

    if rates:
        ax = parts[0].add_subplot()
        bar = 0.8 / len(models)
        for j, model in enumerate(models):
            ys, xs, lo, hi = [], [], [], []
            for i, (_, per) in enumerate(rates):
                m = per.get(model)
                if m and m.get("value") is not None:
                    v, dl, dh = _point(m, 100)
                    ys.append(i + (j - (len(models) - 1) / 2) * bar)
                    xs.append(v), lo.append(dl), hi.append(dh)
            ax.barh(ys, xs, height=bar, xerr=[lo, hi], color=colors[model], capsize=2,
                    error_kw={"elinewidth": 1, "ecolor": "#333"})
        ax.set_yticks(range(len(rates)), [_title(n, per, 34) for n, per in rates])
        ax.set_ylim(len(rates) - 0.5, -0.5)  # first metric on top, as in the table
        ax.set_xlim(0, 101)  # a whisker ending at 100% stays visible
        ax.set_xlabel("% of items")
        ax.set_title("Rates", loc="left", fontsize=11)
        ax.grid(axis="x", alpha=0.3)

    if means:
        axes = parts[-1].subplots(mean_rows, cols, squeeze=False).ravel()
        for ax, (name, per) in zip(axes, means):
            present = [m for m in models if per.get(m) and per[m].get("value") is not None]
            points = [_point(per[m], 1) for m in present]
            ax.bar(range(len(present)), [p[0] for p in points],
                   yerr=[[p[1] for p in points], [p[2] for p in points]], color=[colors[m] for m in present],
                   capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333"})
            if present:
                _model_ticks(ax, present)
            if any(p[0] - p[1] < 0 for p in points):
                ax.axhline(0, color="#333", linewidth=0.8)
            ax.set_title(_title(name, per, 32), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        for ax in axes[len(means):]:
            ax.set_visible(False)
    _legend(parts[-1], models, colors)
    return fig


def refusal_figure(points: list[tuple[str, str, dict, dict, str]], models: list[str],
                   colors: dict[str, str]) -> Figure | None:
    """Refusal rate (harmful prompts) against over-refusal rate (benign prompts), one point per model and judge.

    points: [(model, source, refusal metric, over-refusal metric, judge)]; source names the benchmark(s)
    the pair comes from, judge the judge that classified the answers (the keyword judge, an LLM judge).
    Each (source, judge) gets a marker of its own when there are several, every judge after the first
    a hollow one, and a dotted line joins one model's points from different judges on one source.
    """
    if not points:
        return None
    sources = list(dict.fromkeys(p[1] for p in points))
    judges = list(dict.fromkeys(p[4] for p in points))
    markers = dict(zip(dict.fromkeys((p[1], p[4]) for p in points), "osD^vP*X"))
    # The legend sits under the axes, two columns; the figure grows by its rows.
    legend_rows = -(-len(points) // 2)
    fig = Figure(figsize=(9.5, 6.2 + 0.28 * legend_rows), layout="constrained")
    ax = fig.add_subplot()
    for model in models:
        for source in sources:
            mine = [p for p in points if p[0] == model and p[1] == source]
            if len(mine) > 1:
                ax.plot([100 * p[3]["value"] for p in mine], [100 * p[2]["value"] for p in mine], linestyle=":",
                        linewidth=1.2, color=colors[model], zorder=1)
    if len(judges) > 1:  # the legend lists a model's points from each judge together
        points = sorted(points, key=lambda p: models.index(p[0]))
    for model, source, refusal, over, judge in points:
        x, xl, xh = _point(over, 100)
        y, yl, yh = _point(refusal, 100)
        tags = ([source] if len(sources) > 1 else []) + ([judge] if len(judges) > 1 else [])
        label = f"{model} ({', '.join(tags)})" if tags else model
        hollow = {"markerfacecolor": "white", "markeredgewidth": 1.8} if judges.index(judge) else {}
        ax.errorbar([x], [y], xerr=[[xl], [xh]], yerr=[[yl], [yh]], fmt=markers.get((source, judge), "o"),
                    markersize=8, color=colors[model], capsize=3, label=label, **hollow)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("over-refusal rate on benign prompts (%), lower is better")
    ax.set_ylabel("refusal rate on harmful prompts (%), higher is better")
    title = "Refusal vs over-refusal" + (f" ({sources[0]})" if len(sources) == 1 else "")
    if len(judges) > 1:
        title += f"\nfilled: judge {judges[0]}; hollow: judge {', '.join(judges[1:])}"
    fig.suptitle(title + "\nbest: top left; whiskers: 95% Wilson interval", fontsize=12)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def ranking_figure(groups: list[tuple[str, dict[str, dict]]], models: list[str], colors: dict[str, str]) -> Figure | None:
    """Response-ranking accuracy: for each (benchmark, ranking metric) group, one bar per model."""
    if not groups:
        return None
    fig = Figure(figsize=(max(6.5, 1.2 + len(groups) * (0.5 * len(models) + 0.8)), 4.8), layout="constrained")
    ax = fig.add_subplot()
    bar = 0.8 / len(models)
    for j, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, (_, per) in enumerate(groups):
            m = per.get(model)
            if m and m.get("value") is not None:
                v, dl, dh = _point(m, 100)
                xs.append(i + (j - (len(models) - 1) / 2) * bar)
                ys.append(v), lo.append(dl), hi.append(dh)
        ax.bar(xs, ys, width=bar, yerr=[lo, hi], color=colors[model], capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#333"})
    ax.set_xticks(range(len(groups)), ["\n".join(textwrap.fill(line, 30) for line in g[0].split("\n")) for g in groups])
    ax.set_ylim(0, 101)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Response ranking accuracy\n(whiskers: 95% intervals, Wilson for top-1, bootstrap for the pairwise share)",
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, models, colors)
    return fig


# (share key, count key, colour, legend label) of the pairwise outcomes, stacked left to right.
OUTCOMES = [("win_share", "wins", "#55A868", "wins (judge prefers the model)"),
            ("tie_share", "ties", "#BBBBBB", "ties"),
            ("loss_share", "losses", "#C44E52", "losses (judge prefers the reference)")]


def pairwise_figure(panels: list[tuple[str, dict[str, dict]]], models: list[str]) -> Figure | None:
    """Win / tie / loss against a reference: one panel per (benchmark, reference), a stacked bar per model.

    panels: [(title, {model: {"win_share", "wins", ..., "win_rate", "rtune_lc_win_rate": metric dict}})].
    Segments are shares of the judged items, with their counts written inside; a black diamond marks
    the win rate (mean preference) with its 95% interval, a hollow triangle rtune's length-controlled
    estimate (not AlpacaEval's LC win rate), named in the legend as its label says.
    """
    if not panels:
        return None
    def lc_label(m: dict) -> str:
        return m.get("label") or "rtune's length-controlled estimate"

    lc_labels = list(dict.fromkeys(lc_label(per[m]["rtune_lc_win_rate"]) for _, per in panels for m in per
                                   if (per[m].get("rtune_lc_win_rate") or {}).get("value") is not None))
    lc_markers = dict(zip(lc_labels, "v^<>"))
    heights = [1.1 + 0.55 * len(per) for _, per in panels]
    fig = Figure(figsize=(WIDTH, sum(heights) + 1.6), layout="constrained")
    fig.suptitle("Pairwise LLM judge: the model's output against the reference's", fontsize=13)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, (title, per) in zip(axes, panels):
        present = [m for m in models if m in per]
        for i, model in enumerate(present):
            left = 0.0
            for share, count, color, _ in OUTCOMES:
                m = per[model].get(share) or {}
                width = 100 * (m.get("value") or 0)
                ax.barh(i, width, left=left, height=0.6, color=color)
                n = (per[model].get(count) or {}).get("value")
                if n is not None and width >= 4:
                    ax.text(left + width / 2, i, f"{n:g}", ha="center", va="center", fontsize=9,
                            color="#222" if share == "tie_share" else "white")
                left += width
            win = per[model].get("win_rate") or {}
            if win.get("value") is not None:
                x, xl, xh = _point(win, 100)
                ax.errorbar([x], [i - 0.12], xerr=[[xl], [xh]], fmt="D", color="black", markersize=7, capsize=4,
                            elinewidth=1.5, zorder=3)
            lc = per[model].get("rtune_lc_win_rate") or {}
            if lc.get("value") is not None:
                x, xl, xh = _point(lc, 100)
                ax.errorbar([x], [i + 0.14], xerr=[[xl], [xh]], fmt=lc_markers[lc_label(lc)],
                            color="black", markerfacecolor="white", markersize=8, capsize=3, elinewidth=1, zorder=3)
        ticks = [f"{m}\n{(per[m].get('win_rate') or {}).get('n', '?')} judged" for m in present]
        ax.set_yticks(range(len(present)), ticks)
        ax.set_ylim(len(present) - 0.5, -0.5)  # first model on top
        ax.set_xlim(0, 100)
        ax.axvline(50, color="#555", linestyle="--", linewidth=0.8)
        ax.set_xlabel("% of judged items (both presentation orders averaged; dashed: 50%)")
        ax.set_title(title, loc="left", fontsize=11)
    handles = [Patch(color=color, label=label) for _, _, color, label in OUTCOMES]
    handles.append(Line2D([], [], marker="D", color="black", linestyle="-", markersize=7,
                          label="win rate, 95% interval"))
    handles += [Line2D([], [], marker=lc_markers[label], color="black", markerfacecolor="white", linestyle="-",
                       markersize=8, label=label) for label in lc_labels]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return fig


def aspects_figure(panels: list[tuple[str, list[tuple[str, dict[str, dict]]]]], models: list[str],
                   colors: dict[str, str]) -> Figure | None:
    """LLM judge scores 1-5, models side by side: one panel per benchmark, a group of bars per aspect.

    panels: [(title, [(aspect, {model: metric dict})])]; bars carry their 95% interval as whiskers.
    """
    if not panels:
        return None
    fig = Figure(figsize=(WIDTH, 3.6 * len(panels) + 1.2), layout="constrained")
    fig.suptitle("Aspect scores by the LLM judge, 1-5 (whiskers: 95% bootstrap interval)", fontsize=13)
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (title, groups) in zip(axes, panels):
        present = [m for m in models if any(m in per for _, per in groups)]
        bar = 0.8 / len(present)
        for j, model in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for i, (_, per) in enumerate(groups):
                if model in per:
                    v, dl, dh = _point(per[model], 1)
                    xs.append(i + (j - (len(present) - 1) / 2) * bar)
                    ys.append(v), lo.append(dl), hi.append(dh)
            # Bars rise from the scale's floor, 1, so their heights compare like the scores do.
            ax.bar(xs, [y - 1 for y in ys], bottom=1, width=bar, yerr=[lo, hi], color=colors[model], capsize=2,
                   error_kw={"elinewidth": 1, "ecolor": "#333"})
        ax.set_xticks(range(len(groups)), [g[0] for g in groups])
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylim(1, 5.15)
        ax.set_yticks([1, 2, 3, 4, 5])
        ax.set_ylabel("score (1-5)")
        ax.set_title(title, loc="left", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, [m for m in models if any(m in per for _, groups in panels for _, per in groups)], colors)
    return fig


def lengths_figure(lengths: dict[str, dict[str, list[int]]], caps: dict[str, int | None], models: list[str],
                   colors: dict[str, str]) -> Figure | None:
    """Output length in tokens: a box per model, one panel per benchmark.

    lengths: {bench: {model: [num_tokens, ...]}}; caps: {bench: max_new_tokens or None}, drawn as a
    dashed line so outputs cut at the limit stand out.
    """
    benches = [b for b, per in lengths.items() if any(per.values())]
    if not benches:
        return None
    cols = min(2, len(benches))
    rows = math.ceil(len(benches) / cols)
    fig = Figure(figsize=(WIDTH, 3.8 * rows + 0.9), layout="constrained")
    fig.suptitle("Output length per model (box: quartiles, line: median, triangle: mean, circles: outliers)",
                 fontsize=12)
    for k, bench in enumerate(benches):
        ax = fig.add_subplot(rows, cols, k + 1)
        present = [m for m in models if lengths[bench].get(m)]
        boxes = ax.boxplot([lengths[bench][m] for m in present], positions=range(len(present)), widths=0.6,
                           patch_artist=True, showmeans=True,
                           medianprops={"color": "#222"}, meanprops={"markerfacecolor": "white", "markeredgecolor": "#222"})
        for patch, m in zip(boxes["boxes"], present):
            patch.set_facecolor(colors[m])
            patch.set_alpha(0.8)
        _model_ticks(ax, present)
        title = bench
        if caps.get(bench):  # named in the title: a label beside the line would collide with boxes or the frame
            ax.axhline(caps[bench], color="#C44E52", linestyle="--", linewidth=1)
            title += f" (dashed: max_new_tokens = {caps[bench]})"
        ax.set_ylim(bottom=0)
        ax.set_ylabel("tokens")
        ax.set_title(title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    return fig
