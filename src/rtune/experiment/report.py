"""The reproduction report of an experiment folder: one table per table of the paper, with plots.

    preference      RT against IT, per model and data (the pairwise judge, when the grid has one,
                    and the paired judge-free differences on the held-out set)
    aspects         JustEval-style overall score per cell (when the grid's judge scores aspects)
    core            lm-eval average per cell (when the grid lists lm-eval tasks)
    refusal         refusal on the harmful sets and false refusal on the over-refusal sets, RT and IT
                    side by side, per refusal count N (keyword heuristic; LLM judge when present)
    refined         refined against original responses, per method
    held-out        judge-free quality on the held-out instructions, per cell and baseline
With `paper=True` the paper's figures (paper_results.json) stand in a column beside ours wherever a
cell matches (same base, data, method, N), with a mark where our judge or set differs from the
paper's. Rates pool the items of the sets they cover (Wilson interval), where the paper averages
per-set rates; both are named.
"""

from __future__ import annotations

import json
from pathlib import Path

from rtune.errors import RtuneError
from rtune.eval.metrics.intervals import WILSON, rate_with_ci
from rtune.eval.results import metric, read_items, read_summaries
from rtune.experiment.compare import read_comparison
from rtune.io import write_text_atomic
from rtune.report import plots
from rtune.report.tables import MISSING, format_metric, to_html, to_markdown

PAPER = Path(__file__).with_name("paper_results.json")
TITLE = "rtune reproduction report"
FRR_BENCHES = ("rtune-xs-safe", "xstest")  # sets of safe prompts that look unsafe: refusing them is false refusal
KEYWORD = "keyword-v1"
DIFFERS = "≠"


def paper_results() -> dict:
    return json.loads(PAPER.read_text(encoding="utf-8"))


def paper_model(spec: str, paper: dict) -> str | None:
    """The paper's key of a model spec ("meta-llama/Llama-3.1-8B" -> "llama-3.1-8b"), or None."""
    name = Path(str(spec).rstrip("/")).name.lower()
    return next((key for key in paper["models"] if name == key or name.startswith(key + "-")), None)


# -- reading ---------------------------------------------------------------------------------------
def _summaries(eval_dir: str) -> dict[str, dict]:
    try:
        return {s["benchmark"]["name"]: s for s in read_summaries(eval_dir)}
    except RtuneError:
        return {}


def _items(eval_dir: str, bench: str) -> list[dict]:
    summary = _summaries(eval_dir).get(bench)
    return read_items(summary["_dir"]) if summary else []


def _judges(eval_dir: str) -> list[str]:
    """The LLM judges that labelled refusals in an evaluation (beside the keyword heuristic)."""
    found = []
    for summary in _summaries(eval_dir).values():
        llm = (summary.get("judges") or {}).get("llm") or {}
        if "refusal" in (llm.get("kinds") or []) and llm.get("model") not in found:
            found.append(llm["model"])
    return found


def pooled_refusal(eval_dir: str, harmful: bool, judge: str = KEYWORD, benches=None) -> dict | None:
    """The refusal rate over every item with that harmful flag in the evaluation's sets (or `benches`)."""
    values = []
    for bench in _summaries(eval_dir):
        if benches is not None and bench not in benches:
            continue
        if benches is None and not harmful:
            continue  # false refusal is measured on the over-refusal sets only
        for row in _items(eval_dir, bench):
            if row.get("harmful") is not harmful:
                continue
            label = (row.get("judgments") or {}).get(judge)
            label = label.get("refusal") if isinstance(label, dict) else label
            values.append(None if label not in ("refusal", "compliance") else label == "refusal")
    value, ci, n = rate_with_ci(values)
    if not n:
        return None
    unclassified = sum(v is None for v in values)
    what = "refusal on harmful prompts" if harmful else "false refusal on safe prompts"
    return metric(value, ci, n, "rate", f"{what} ({judge})" + (f", {unclassified} unclassified left out"
                                                              if unclassified else ""), harmful, judge, WILSON)


# -- tables ----------------------------------------------------------------------------------------
def _cell_label(c: dict) -> tuple[str, str]:
    """(model, data) as a reader names them: a local file by its stem, a sample by its size."""
    source = Path(c["source"]).stem if Path(c["source"]).suffix else c["source"]
    return Path(c["model"].rstrip("/")).name, source + (f":{c['size']}" if c.get("size") else "")


def _paper_cell(paper: dict, table: str, c: dict):
    key = paper_model(c["model"], paper)
    return ((paper.get(table) or {}).get(key) or {}).get(c["source"]) if key else None


def refusal_table(index: dict, paper: dict | None) -> tuple[list[tuple], list[dict]]:
    """Blocks of the refusal table, and its points for the plot."""
    groups: dict = {}
    for r in index["cells"]:
        c = r["cell"]
        groups.setdefault((c["model"], c["source"], c["size"], c["refined"]), {})[(c["method"], c["refusals"])] = r
    judges = sorted({j for r in index["cells"] for j in _judges(r["eval_dir"])})
    rows, points = [], []
    header = ["model", "data", "N"]
    methods = sorted({r["cell"]["method"] for r in index["cells"]}, key=lambda m: (m != "rt", m))
    for m in methods:
        header += [f"{m.upper()} refusal", f"{m.upper()} FRR"]
        header += [f"{m.upper()} refusal ({j})" for j in judges] + [f"{m.upper()} FRR ({j})" for j in judges]
    if paper:
        header += [f"paper {m.upper()} refusal / FRR" for m in methods if m in ("rt", "it")]
    frr_sets = sorted({b for r in index["cells"] for b in _summaries(r["eval_dir"]) if b in FRR_BENCHES})
    for (model, source, size, refined), cells in sorted(groups.items(), key=str):
        for n in sorted({k[1] for k in cells}):
            c = {"model": model, "source": source, "size": size}
            name, data = _cell_label(c)
            row = [name, data + (" (refined)" if refined else ""), str(n)]
            for m in methods:
                r = cells.get((m, n))
                measured = {}
                for judge in [KEYWORD] + judges:
                    harm = pooled_refusal(r["eval_dir"], True, judge) if r else None
                    frr = pooled_refusal(r["eval_dir"], False, judge, frr_sets) if r else None
                    measured[judge] = (harm, frr)
                    points.append({"group": f"{name} {data}", "method": m, "n": n, "judge": judge,
                                   "refusal": harm, "frr": frr})
                row += [format_metric(x) for x in measured[KEYWORD]]
                row += [format_metric(measured[j][0]) for j in judges] + [format_metric(measured[j][1]) for j in judges]
            if paper:
                found = _paper_cell(paper, "refusal", c)
                counts = paper["refusal_counts"]
                matches = found and n in counts and size in (None, 1000)
                for m in methods:
                    if m not in ("rt", "it"):
                        continue
                    if matches and m in found:
                        i = counts.index(n)
                        row.append(f"{found[m]['refusal'][i]:.2f} / {found[m]['frr'][i]:.2f} {DIFFERS}")
                    else:
                        row.append(MISSING)
            rows.append(row)
    if not rows:
        return [], []
    about = (f"Refusal: the share of the harmful prompts of every evaluated set (pooled; the paper averages per-set "
             f"rates) judged a refusal. FRR: the share of the safe prompts of {', '.join(frr_sets) or 'no over-refusal set'}"
             " judged a refusal. Columns without a judge name use the keyword heuristic (keyword-v1: a refusal "
             "phrase anywhere in the output); Wilson 95% intervals.")
    if paper:
        about += (f" Paper columns: {paper['setup']['refusal_judge']}; {DIFFERS} marks a different judge and "
                  "different sets than ours.")
    return [("h", 2, "Refusal and false refusal against the number of refusal examples N"), ("p", about),
            ("table", header, rows)], points


def _comparison_rows(index: dict, kind: str) -> list[dict]:
    return [{**c, "data": read_comparison(c["file"])} for c in index["comparisons"] if c["kind"] == kind]


def _harmful(name: str, bench: str, index: dict) -> bool:
    """Whether a cell's benchmark holds harmful prompts (its items say so)."""
    record = next((r for r in index["cells"] if r["name"] == name), None)
    return bool(record) and any(row.get("harmful") for row in _items(record["eval_dir"], bench))


def preference_table(index: dict, paper: dict | None, kind: str) -> list[tuple]:
    found = _comparison_rows(index, kind)
    if not found:
        return []
    title = {"method": "Preference: RT against IT", "refined": "Refined against original responses"}[kind]
    header = ["A", "B", "benchmark", "judge: A wins (ties 1/2)", "rtune LC estimate", "ROUGE-L A - B",
              "answered A - B"]
    if paper:
        header.append("paper (AlpacaEval 2.0 LC, A vs B)")
    rows = []
    for comp in found:
        data = comp["data"]
        # Preference is about helpfulness: refusal sets have their own table.
        benches = sorted(b for b in set(data["paired"]) | set(data.get("judged") or {})
                         if b not in FRR_BENCHES and not _harmful(comp["a"], b, index))
        for bench in benches:
            judged = (data.get("judged") or {}).get(bench) or {}
            win = judged.get("vs_b_win_rate")
            lc = judged.get("vs_b_rtune_lc_win_rate")
            paired = data["paired"].get(bench) or {}
            if not (win or "rouge_l" in paired or "answered" in paired):
                continue
            row = [comp["a"], comp["b"], bench, format_metric(win) if win else "not judged",
                   format_metric(lc) if lc else MISSING,
                   format_metric({**paired["rouge_l"], "kind": "mean"}) if "rouge_l" in paired else MISSING,
                   format_metric({**paired["answered"], "kind": "rate"}) if "answered" in paired else MISSING]
            if paper:
                cell = data["a"]["cell"]
                if kind == "method":
                    found_lc = _paper_cell(paper, "lc_win_rate_rt_vs_it", cell) if cell["method"] == "rt" else None
                    row.append(f"{found_lc}% {DIFFERS}" if found_lc is not None else MISSING)
                else:
                    low, high = paper["refined_lc_vs_original"].get(cell["method"], (None, None))
                    row.append(f"{low}-{high}% (range over the paper's cells) {DIFFERS}" if low else MISSING)
            rows.append(row)
    about = ("A and B answered the same items. Judge: the grid's pairwise LLM judge (both presentation orders, "
             "bootstrap 95% interval) with B as the reference; rtune's LC estimate is rtune's length-term fit, not "
             "AlpacaEval's LC win rate. Differences: paired, on the items both answered (ROUGE-L against the "
             "held-out reference: paired bootstrap; answered, a heuristic: Newcombe).")
    if paper:
        about += f" Paper: {paper['setup']['preference_judge']}; {DIFFERS}: a different judge, reference and set."
    return [("h", 2, title), ("p", about), ("table", header, rows)]


HELDOUT_METRICS = (("rouge_l", "ROUGE-L vs reference"), ("reference_similarity", "similarity (MiniLM)"),
                   ("ranking_top1", "ranking top-1"), ("answered", "answered (heuristic)"),
                   ("cut_at_length", "cut at max tokens"), ("aspect_overall", "judge overall (1-5)"))


def heldout_table(index: dict, paper: dict | None) -> tuple[list[tuple], list[dict]]:
    entries = [(r["name"], r["cell"], r["eval_dir"]) for r in index["cells"]]
    entries += [(b["name"], None, b["eval_dir"]) for b in index["baselines"]]
    rows, points = [], []
    present = [(k, t) for k, t in HELDOUT_METRICS
               if any(k in (_summaries(d).get("heldout") or {}).get("metrics", {}) for _, _, d in entries)]
    for name, cell, eval_dir in entries:
        summary = _summaries(eval_dir).get("heldout")
        if not summary:
            continue
        m = summary["metrics"]
        rows.append([name] + [format_metric(m.get(k)) for k, _ in present])
        if cell:
            points.append({"cell": cell, "metrics": {k: m.get(k) for k, _ in present}})
    if not rows:
        return [], []
    return [("h", 2, "Held-out instructions (judge-free)"),
            ("p", "The instructions held out of training, answered by every cell and baseline: content against the "
                  "reference response first (ROUGE-L, MiniLM similarity), then response ranking and the format "
                  "heuristics. 95% intervals: bootstrap for means, Wilson for rates."),
            ("table", ["cell"] + [t for _, t in present], rows)], points


def core_table(index: dict, paper: dict | None) -> list[tuple]:
    rows = []
    for r in index["cells"]:
        lm = _summaries(r["eval_dir"]).get("lm-eval")
        if lm:
            c = r["cell"]
            row = [r["name"], format_metric(lm["metrics"].get("average"))]
            if paper:
                found = _paper_cell(paper, "core_average", c)
                row.append(f"{found[c['method']]} {DIFFERS}" if found and c["method"] in found else MISSING)
            rows.append(row)
    if not rows:
        return []
    header = ["cell", "lm-eval average"] + (["paper average (its six tasks)"] if paper else [])
    return [("h", 2, "Core capabilities (lm-evaluation-harness)"), ("table", header, rows)]


def aspects_table(index: dict, paper: dict | None) -> list[tuple]:
    rows = []
    for r in index["cells"]:
        for bench, s in _summaries(r["eval_dir"]).items():
            overall = s["metrics"].get("aspect_overall")
            if overall:
                c = r["cell"]
                row = [r["name"], bench, format_metric(overall)]
                if paper:
                    found = _paper_cell(paper, "justeval_overall", c)
                    row.append(f"{found[c['method']]:.2f} {DIFFERS}" if found and c["method"] in found else MISSING)
                rows.append(row)
    if not rows:
        return []
    header = ["cell", "benchmark", "overall (1-5)"] + (["paper JustEval overall"] if paper else [])
    return [("h", 2, "Aspect scores (JustEval style)"), ("table", header, rows)]


# -- plots -----------------------------------------------------------------------------------------
def refusal_figure(points: list[dict]):
    from matplotlib.figure import Figure

    keyword = [p for p in points if p["judge"] == KEYWORD]
    groups = list(dict.fromkeys(p["group"] for p in keyword))
    if not groups or len({p["n"] for p in keyword}) < 2:
        return None
    fig = Figure(figsize=(plots.WIDTH, 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False).ravel()
    colors = plots.model_colors(sorted({p["method"] for p in keyword}, key=lambda m: (m != "rt", m)))
    for ax, group in zip(axes, groups):
        for method, color in colors.items():
            for what, style in (("refusal", "-o"), ("frr", "--s")):
                pts = sorted((p for p in keyword if p["group"] == group and p["method"] == method and p[what]),
                             key=lambda p: p["n"])
                if not pts:
                    continue
                xs = [p["n"] for p in pts]
                ys = [100 * p[what]["value"] for p in pts]
                err = [[100 * (p[what]["value"] - p[what]["ci"][0]) for p in pts],
                       [100 * (p[what]["ci"][1] - p[what]["value"]) for p in pts]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=4,
                            label=f"{method.upper()} {'refusal (harmful)' if what == 'refusal' else 'FRR (safe)'}")
        ax.set_title(group, loc="left")
        ax.set_xlabel("refusal examples mixed into training (N)")
        ax.set_ylabel("% judged refusal (keyword)")
        ax.set_ylim(-2, 102)
        ax.set_xticks(sorted({p["n"] for p in keyword}))
        ax.legend(loc="upper left", fontsize=9, frameon=False)
    fig.suptitle("Refusal on harmful prompts and false refusal on safe ones, against N (95% Wilson intervals)")
    return fig


def size_figure(points: list[dict]):
    """Held-out metrics against the training data size, per method (when the grid has several sizes)."""
    from matplotlib.figure import Figure

    sized = [p for p in points if p["cell"]["size"] is not None and not p["cell"]["refusals"]
             and not p["cell"]["refined"]]
    if len({p["cell"]["size"] for p in sized}) < 2:
        return None
    keys = [k for k, _ in HELDOUT_METRICS if any(p["metrics"].get(k) for p in sized)][:3]
    fig = Figure(figsize=(plots.WIDTH, 3.4), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False).ravel()
    methods = sorted({p["cell"]["method"] for p in sized})
    colors = plots.model_colors(methods)
    for ax, key in zip(axes, keys):
        for method in methods:
            pts = sorted((p for p in sized if p["cell"]["method"] == method and p["metrics"].get(key)),
                         key=lambda p: p["cell"]["size"])
            scale = 100 if pts and pts[0]["metrics"][key]["kind"] == "rate" else 1
            ys = [plots._point(p["metrics"][key], scale) for p in pts]
            ax.errorbar([p["cell"]["size"] for p in pts], [y[0] for y in ys], yerr=[[y[1] for y in ys],
                        [y[2] for y in ys]], fmt="-o", color=colors[method], capsize=4, label=method.upper())
        ax.set_xscale("log")
        ax.set_xlabel("training records")
        ax.set_title(dict(HELDOUT_METRICS)[key], loc="left", fontsize=10)
        ax.legend(frameon=False, fontsize=9)
    fig.suptitle("Held-out quality against the data size")
    return fig


def build_reproduction_report(out: str | Path, report_dir: str | Path, paper: bool = False) -> Path:
    """report.md, report.html and PNGs of an experiment folder; returns report.md's path."""
    out, report_dir = Path(out), Path(report_dir)
    index_file = out / "cells.json"
    if not index_file.is_file():
        raise RtuneError(f"{out} holds no finished experiment (no {index_file}); run rtune experiment first")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    figures_about = paper_results() if paper else None
    report_dir.mkdir(parents=True, exist_ok=True)
    grid = json.loads((out / "grid.json").read_text(encoding="utf-8"))
    blocks = [("h", 1, TITLE),
              ("p", f"Grid {grid['path']} (sha256 {grid['sha256'][:12]}): {len(index['cells'])} cells, "
                    f"{len(index['baselines'])} baseline evaluations, {len(index['comparisons'])} comparisons. "
                    "Every number comes from the evaluation folders listed under Cells; intervals are 95%.")]
    if paper:
        blocks.append(("p", "Paper columns: An, Kim & Kim (arXiv 2410.02465), "
                            f"{figures_about['setup']['training']}. {DIFFERS} marks a paper figure made with another "
                            "judge, reference or set than ours: read it as the paper's number beside ours, not as the "
                            "same measurement."))
    blocks += preference_table(index, figures_about, "method")
    refusal_blocks, refusal_points = refusal_table(index, figures_about)
    blocks += refusal_blocks
    heldout_blocks, heldout_points = heldout_table(index, figures_about)
    blocks += heldout_blocks
    blocks += aspects_table(index, figures_about)
    blocks += core_table(index, figures_about)
    blocks += preference_table(index, figures_about, "refined")
    for name, fig, caption in (("refusal_vs_n.png", refusal_figure(refusal_points),
                                "Refusal (solid) and false refusal (dashed) against N, RT and IT"),
                               ("size.png", size_figure(heldout_points), "Held-out quality against the data size")):
        if fig is not None:
            plots.save_png(fig, report_dir / name)
            blocks += [("img", name, caption)]
    cells = [(r["name"], f"run {r['run_dir']}; eval {r['eval_dir']}") for r in index["cells"]]
    cells += [(b["name"], f"eval {b['eval_dir']}") for b in index["baselines"]]
    blocks += [("h", 2, "Cells"), ("pairs", cells)]
    write_text_atomic(report_dir / "report.md", to_markdown(blocks))
    write_text_atomic(report_dir / "report.html", to_html(blocks, report_dir, TITLE))
    return report_dir / "report.md"
