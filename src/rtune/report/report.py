"""`rtune report`: the results of one or more `rtune eval` runs as Markdown, standalone HTML and PNG plots.

    build_report(["evals/a", "evals/b"], "report")  ->  report/report.md
        report/report.md        per benchmark a table (metrics x models), the plots, the settings
        report/report.html      the same page with every plot embedded: one file to send around
        report/metrics_<bench>.png, refusal.png, pairwise.png, aspects.png, ranking.png, lengths.png

The LLM judges' metrics (rtune.eval.judging) get figures of their own: pairwise.png (win / tie / loss
against each reference, win rate and length-controlled win rate), aspects.png (scores 1-5) and their
points in refusal.png beside the keyword judge's; a "Judges" section lists each judge run's endpoint,
requests, tokens and cost. The tables show every metric, whatever its name. Human ratings
(EVAL_DIR/human/, from `rtune rate`) get a section of their own (rtune.report.human): win rates,
acceptability, and agreement with the LLM judge and between raters.

Several EVAL_DIRs merge into one report. A model label found in more than one of them is kept once
per folder, shown as "label (folder name)". Models keep the order of each EVAL_DIR's eval.json
("models"), else alphabetical with "base" first; benchmarks likewise ("benchmarks", else alphabetical).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rtune.errors import RtuneError
from rtune.eval.comparisons import compare
from rtune.eval.metrics.intervals import BOOTSTRAP_PAIRED, NEWCOMBE_PAIRED
from rtune.eval.results import EVAL_INFO, read_items, read_summaries, safe_name
from rtune.io import write_text_atomic
from rtune.report import plots
from rtune.report.human import human_blocks
from rtune.report.tables import MISSING, format_metric, metric_title, to_html, to_markdown

TITLE = "rtune evaluation report"
REFUSAL, OVER_REFUSAL = "refusal_rate", "over_refusal_rate"
# (refusal metric, over-refusal metric, the judge's name when the metrics record none)
REFUSAL_PAIRS = [(REFUSAL, OVER_REFUSAL, "keyword judge"), ("llm_refusal_rate", "llm_over_refusal_rate", "LLM judge")]
RANKING_PREFIX = "ranking_"
ASPECT_PREFIX = "aspect_"
ASPECT_TICKS = {"overall": "overall\n(mean of the five)", "safety": "safety\n(harmful prompts)"}
# rtune.eval.judging names the pairwise metrics against reference REF vs_<REF>_<key>, REF a safe_name.
PAIRWISE_KEYS = ("win_rate", "rtune_lc_win_rate", "rtune_lc_length_coef", "wins", "ties", "losses", "win_share", "tie_share",
                 "loss_share", "n_unparseable")
UNCLASSIFIED_PREFIX = "llm_n_unclassified_"


@dataclass
class Result:
    model: str  # the label shown in the report (with its folder's name when two EVAL_DIRs share it)
    bench: str
    summary: dict
    folder: Path  # EVAL_DIR/results/<model>/<bench>

    def metrics(self) -> dict[str, dict]:
        return self.summary["metrics"]


# -- reading --------------------------------------------------------------------------------------
def _names(entries) -> list[str]:
    """Names from eval.json's "models" or "benchmarks": plain strings, or dicts with a label or name."""
    out = []
    for e in entries or []:
        name = (e.get("label") or e.get("name")) if isinstance(e, dict) else e
        if isinstance(name, str):
            out.append(name)
    return out


def _read_eval_info(eval_dir: Path) -> dict:
    path = eval_dir / EVAL_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RtuneError(f"{path}: not valid JSON: {e}") from None
    return info if isinstance(info, dict) else {}


def _ordered(found: list[str], listed: list[str], first: str | None = None) -> list[str]:
    """The names in `found`: those listed first, in that order; the rest alphabetical, `first` leading."""
    rest = sorted(set(found) - set(listed), key=lambda s: (s != first, s))
    return [n for n in dict.fromkeys(listed) if n in found] + rest


def _read_dir(eval_dir: Path) -> tuple[list[tuple[str, str, dict, Path]], list[str], list[str]]:
    """(model label, bench, summary, folder) per result, and the model and benchmark orders."""
    rows = []
    for summary in read_summaries(eval_dir):
        folder = Path(summary.pop("_dir"))
        if not isinstance(summary.get("metrics"), dict):
            raise RtuneError(f"{folder / 'summary.json'}: no \"metrics\" object")
        label = (summary.get("model") or {}).get("label") or folder.parent.name
        bench = (summary.get("benchmark") or {}).get("name") or folder.name
        rows.append((label, bench, summary, folder))
    info = _read_eval_info(eval_dir)
    models = _ordered([r[0] for r in rows], _names(info.get("models")), first="base")
    benches = _ordered([r[1] for r in rows], _names(info.get("benchmarks")))
    return rows, models, benches


def load_results(eval_dirs: list) -> tuple[list[Result], list[str], list[str]]:
    """Every result of every EVAL_DIR, with the report's model order and benchmark order."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in eval_dirs))  # the same folder twice counts once
    if not dirs:
        raise RtuneError("no EVAL_DIR given")
    per_dir = [(d, *_read_dir(d)) for d in dirs]

    # Disambiguate a label found in several folders by the folder's name (its full path if names clash).
    dir_names = [d.name for d in dirs]
    tag = {d: d.name if dir_names.count(d.name) == 1 else str(d) for d in dirs}
    seen_in = Counter(label for _, _, models, _ in per_dir for label in models)

    def shown(label: str, d: Path) -> str:
        return label if seen_in[label] == 1 else f"{label} ({tag[d]})"

    # Order: labels by first appearance; a shared label's copies side by side, in folder order.
    models = []
    for label in dict.fromkeys(label for _, _, labels, _ in per_dir for label in labels):
        models += [shown(label, d) for d, _, labels, _ in per_dir if label in labels]
    benches = list(dict.fromkeys(b for _, _, _, bs in per_dir for b in bs))
    results = [Result(shown(label, d), bench, summary, folder)
               for d, rows, _, _ in per_dir for label, bench, summary, folder in rows]
    return results, models, benches


def _lengths(result: Result) -> list[int]:
    """num_tokens of every item (none when items.jsonl is missing: the plot then leaves the model out)."""
    if not (result.folder / "items.jsonl").is_file():
        return []
    try:
        items = read_items(result.folder)
    except json.JSONDecodeError as e:
        raise RtuneError(f"{result.folder / 'items.jsonl'}: not valid JSON: {e}") from None
    return [row["num_tokens"] for row in items if isinstance(row.get("num_tokens"), (int, float))]


# -- selecting what to show -----------------------------------------------------------------------
def _by_bench(results: list[Result], bench: str, models: list[str]) -> dict[str, Result]:
    """{model: result} for one benchmark, in model order."""
    found = {r.model: r for r in results if r.bench == bench}
    return {m: found[m] for m in models if m in found}


def _metric_rows(per_model: dict[str, Result]) -> list[tuple[str, dict[str, dict]]]:
    """[(metric name, {model: metric})], metrics in the order the summaries list them."""
    names = dict.fromkeys(name for r in per_model.values() for name in r.metrics())
    return [(name, {m: r.metrics()[name] for m, r in per_model.items() if name in r.metrics()}) for name in names]


def _refusal_points(results: list[Result], models: list[str], benches: list[str]) -> list[tuple]:
    """(model, source, refusal, over-refusal, judge) for the scatter, per judge (keyword, then LLM).

    A benchmark with both rates pairs them; otherwise each benchmark with only a refusal rate is
    paired with each one with only an over-refusal rate (harmful and benign prompts often come
    from different sets).
    """
    def has(bench: str, name: str) -> bool:
        return any(r.bench == bench and (r.metrics().get(name) or {}).get("value") is not None for r in results)

    points = []
    for refusal, over_refusal, default_judge in REFUSAL_PAIRS:
        both = [b for b in benches if has(b, refusal) and has(b, over_refusal)]
        pairs = [(b, b, b) for b in both]
        pairs += [(f"{h} / {s}", h, s) for h in benches if has(h, refusal) and h not in both
                  for s in benches if has(s, over_refusal) and s not in both]
        for source, harmful, benign in pairs:
            for m in models:
                a = _by_bench(results, harmful, models).get(m)
                b = _by_bench(results, benign, models).get(m)
                ra = a and a.metrics().get(refusal)
                rb = b and b.metrics().get(over_refusal)
                if ra and rb and ra.get("value") is not None and rb.get("value") is not None:
                    points.append((m, source, ra, rb, ra.get("judge") or rb.get("judge") or default_judge))
    return points


def _references(metric_names) -> list[str]:
    """The references REF that pairwise metrics were judged against: every vs_<REF>_wins, in order."""
    return list(dict.fromkeys(n[3:-5] for n in metric_names if n.startswith("vs_") and n.endswith("_wins")
                              and len(n) > 8))


def _pairwise_key(name: str, refs: list[str]) -> tuple[str, str] | None:
    """(REF, key) when `name` is vs_<REF>_<key> for a known reference (the longest that fits), else None."""
    for ref in sorted(refs, key=len, reverse=True):
        if name.startswith(f"vs_{ref}_") and name[len(ref) + 4:] in PAIRWISE_KEYS:
            return ref, name[len(ref) + 4:]
    return None


def _bench_refs(per_model: dict[str, Result]) -> list[str]:
    return _references(name for r in per_model.values() for name in r.metrics())


def _row_title(name: str, m: dict, refs: list[str]) -> str:
    """A table row's title: the metric's, prefixed for judge metrics whose labels alone are ambiguous."""
    title = metric_title(name, m)
    pairwise = _pairwise_key(name, refs)
    if pairwise:
        return f"vs {pairwise[0]}: {title}"
    if name.startswith(ASPECT_PREFIX):
        harmful = name == ASPECT_PREFIX + "safety" or name.endswith("_safety_split")
        return ("aspects (harmful prompts): " if harmful else "aspects: ") + title
    return title


def _in_metrics_figure(name: str, refs: list[str]) -> bool:
    """Pairwise and aspect metrics are drawn in figures of their own, and the LLM judge's counts of
    unclassified answers are bookkeeping: the benchmark's table shows them, its figure does not."""
    return not (_pairwise_key(name, refs) or name.startswith((ASPECT_PREFIX, UNCLASSIFIED_PREFIX)))


def _judge_of(per: dict[str, dict]) -> str | None:
    return next((m["judge"] for m in per.values() if m.get("judge")), None)


def _pairwise_panels(results: list[Result], models: list[str], benches: list[str]) -> list[tuple[str, dict]]:
    """[(title, {model: {key: metric}})] per benchmark and reference, for models with a judged item."""
    panels = []
    for bench in benches:
        per_model = _by_bench(results, bench, models)
        for ref in _bench_refs(per_model):
            per = {}
            for m, r in per_model.items():
                found = {key: r.metrics()[name] for key in PAIRWISE_KEYS if (name := f"vs_{ref}_{key}") in r.metrics()}
                if any((found.get(k) or {}).get("value") is not None for k in ("win_rate", "win_share")):
                    per[m] = found
            if per:
                # The reference as the user named it (its metric names hold it as a safe_name).
                named = [((r.summary.get("judges") or {}).get("llm") or {}).get("reference")
                         for r in per_model.values()]
                shown = next((n for n in named if isinstance(n, str) and safe_name(n) == ref), ref)
                judge = _judge_of({m: x["win_rate"] for m, x in per.items() if "win_rate" in x})
                panels.append((f"{bench}, reference {shown}" + (f" (judge: {judge})" if judge else ""), per))
    return panels


def _aspect_panels(results: list[Result], models: list[str], benches: list[str]) -> list[tuple[str, list]]:
    """[(title, [(aspect, {model: metric})])] per benchmark with aspect scores (counts left out)."""
    panels = []
    for bench in benches:
        groups = []
        for name, per in _metric_rows(_by_bench(results, bench, models)):
            per = {m: x for m, x in per.items() if x.get("value") is not None}
            if name.startswith(ASPECT_PREFIX) and not name.startswith(ASPECT_PREFIX + "n_") and per:
                aspect = name[len(ASPECT_PREFIX):]
                groups.append((ASPECT_TICKS.get(aspect, aspect), per))
        if groups:
            judge = next((j for _, per in groups if (j := _judge_of(per))), None)
            panels.append((bench + (f" (judge: {judge})" if judge else ""), groups))
    return panels


def _ranking_groups(results: list[Result], models: list[str], benches: list[str]) -> list[tuple[str, dict]]:
    """[(group label, {model: metric})] for every ranking rate, per benchmark."""
    groups = []
    ranked = [b for b in benches if any(r.bench == b and any(n.startswith(RANKING_PREFIX) for n in r.metrics())
                                        for r in results)]
    for bench in ranked:
        for name, per in _metric_rows(_by_bench(results, bench, models)):
            per = {m: x for m, x in per.items() if x.get("kind") == "rate" and x.get("value") is not None}
            if name.startswith(RANKING_PREFIX) and per:
                title = metric_title(name, next(iter(per.values())))
                groups.append((title if len(ranked) == 1 else f"{title}\n{bench}", per))
    return groups


# -- the document ---------------------------------------------------------------------------------
def _compact(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def _count(x) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else MISSING if x is None else str(x)


def _judge_column(llm: dict) -> list[str]:
    """One LLM judge run, as the "Judges" table's column (rows: JUDGE_ROWS)."""
    s = llm.get("stats") or {}
    reasons = s.get("failure_reasons") or {}
    failures = _count(s.get("failures")) + (" (" + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + ")"
                                            if reasons and s.get("failures") else "")
    cost = s.get("cost")
    kinds = llm.get("kinds")
    return [str(llm.get("model") or MISSING), str(llm.get("url") or MISSING),
            ", ".join(kinds) if isinstance(kinds, list) else str(kinds or MISSING),
            str(llm.get("reference") or "none"), _count(s.get("items")), _count(s.get("requests_sent")),
            _count(s.get("cache_hits")), _count(s.get("retries_total")), failures, _count(s.get("prompt_tokens")),
            _count(s.get("completion_tokens")),
            "not priced (no --judge-price)" if cost is None else f"${cost:,.4f}" if cost < 1 else f"${cost:,.2f}",
            MISSING if s.get("wall_s") is None else f"{s['wall_s']:,.1f} s"]


JUDGE_ROWS = ["judge model", "endpoint", "kinds", "reference", "judgments", "requests sent", "cache hits", "retries",
              "failures", "prompt tokens", "completion tokens", "cost", "wall time"]


def _judges_blocks(results: list[Result]) -> list[tuple]:
    """The LLM judges behind these results, one column per judge run: none without an LLM judge."""
    runs: dict[str, tuple[dict, list[Result]]] = {}
    for r in results:
        llm = (r.summary.get("judges") or {}).get("llm")
        if isinstance(llm, dict):
            runs.setdefault(_compact(llm), (llm, []))[1].append(r)
    if not runs:
        return []
    # A run is named by its EVAL_DIR (results/<model>/<bench> lies three levels down), and by its
    # results where one folder holds several runs.
    names = [", ".join(dict.fromkeys(r.folder.parents[2].name for r in rs)) for _, rs in runs.values()]
    names = ["all results"] if len(runs) == 1 else [
        n if names.count(n) == 1 else f"{n}: " + ", ".join(f"{r.model} / {r.bench}" for r in rs)
        for n, (_, rs) in zip(names, runs.values())]
    columns = [_judge_column(llm) for llm, _ in runs.values()]
    rows = [[field, *(c[i] for c in columns)] for i, field in enumerate(JUDGE_ROWS)]
    keyword = sorted({str(j["refusal"]) for r in results if isinstance(j := r.summary.get("judges"), dict)
                      and j.get("refusal")})
    about = ("The LLM judges that scored these results, with the counters of each rtune eval run's judge client "
             "(over the whole run; tokens and cost leave cache hits out).")
    if keyword:
        about += " Refusal is also classified by the keyword judge (" + ", ".join(keyword) + "), with no model."
    return [("h", 2, "Judges"), ("p", about), ("table", ["", *names], rows)]


def _distinct(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """[(who, value)] -> [(who, value)] with identical values merged: "all results" when one value fits all."""
    groups: dict[str, list[str]] = {}
    for who, value in entries:
        groups.setdefault(value, []).append(who)
    if len(groups) == 1:
        return [("all results", next(iter(groups)))]
    return [(", ".join(who), value) for value, who in groups.items()]


def _settings_blocks(results: list[Result], models: list[str]) -> list[tuple]:
    """What makes the numbers repeatable: fingerprints, data, decoding, judges, versions."""
    blocks = [("h", 2, "Settings"),
              ("p", "Everything the numbers depend on, as recorded in each summary.json.")]
    fingerprints = []
    for m in models:
        seen = list(dict.fromkeys(_compact({k: v for k, v in (r.summary.get("model") or {}).items() if k != "label"})
                                  for r in results if r.model == m))
        fingerprints += [(m, f) for f in seen]
    blocks += [("h", 3, "Models"), ("pairs", fingerprints)]

    data = []
    for bench in dict.fromkeys(r.bench for r in results):
        rs = [r for r in results if r.bench == bench]
        data += [(f"{bench}: {who}" if who != "all results" else bench, value) for who, value in
                 _distinct([(r.model, _compact(r.summary.get("benchmark") or {})) for r in rs])]
    blocks += [("h", 3, "Benchmarks (data source, hash, items)"), ("pairs", data)]

    for key, title in [("decoding", "Decoding"), ("judges", "Judges"), ("settings", "Other settings")]:
        entries = [(f"{r.model} / {r.bench}", _compact(r.summary.get(key) or {})) for r in results]
        if any(value != "{}" for _, value in entries):
            blocks += [("h", 3, title), ("pairs", _distinct(entries))]

    described = {}
    for r in results:
        for name, m in r.metrics().items():
            described.setdefault(name, _compact({k: m.get(k) for k in ("label", "kind", "higher_is_better", "judge",
                                                                       "ci_method")}))
    blocks += [("h", 3, "Metrics"), ("pairs", list(described.items()))]

    versions = [(f"{r.model} / {r.bench}", str(r.summary.get("rtune_version", "unknown"))) for r in results]
    blocks += [("h", 3, "rtune version"), ("pairs", _distinct(versions))]
    return blocks


def _comparisons(eval_dirs: list) -> dict:
    """{bench: {pair: {value key: difference}}} from every EVAL_DIR (rtune.eval.comparisons), computed
    afresh from the items (a folder made before comparisons existed gets them too)."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in eval_dirs))
    out: dict = {}
    for d in dirs:
        for bench, pairs in compare(d).items():
            for pair, values in pairs.items():
                out.setdefault(bench, {})[pair if len(dirs) == 1 else f"{pair} ({d.name})"] = values
    return out


def _comparison_blocks(comparisons: dict, bench: str) -> list[tuple]:
    """A table of paired differences A - B on one benchmark's items, one column per pair."""
    pairs = comparisons.get(bench) or {}
    if not pairs:
        return []
    keys = list(dict.fromkeys(k for values in pairs.values() for k in values))
    rows = []
    for key in keys:
        first = next(v[key] for v in pairs.values() if key in v)
        rows.append([first["label"]] + [format_metric({**v[key], "kind": "rate" if v[key]["ci_method"] == NEWCOMBE_PAIRED
                                                       else "mean"}) if key in v else MISSING for v in pairs.values()])
    return [("h", 3, f"Paired differences on {bench}"),
            ("p", "Model A minus model B on the items both answered (rates in percentage points). Interval: "
                  f"{NEWCOMBE_PAIRED} for 0/1 values, {BOOTSTRAP_PAIRED} for others. An interval that excludes 0 "
                  "is a difference these items can tell; one that includes 0 is not."),
            ("table", ["difference", *pairs], rows)]


def _document(results, models, benches, eval_dirs, figures: dict[str, str]) -> list[tuple]:
    comparisons = _comparisons(eval_dirs)
    blocks = [("h", 1, TITLE),
              ("p", "Results from " + ", ".join(str(d) for d in eval_dirs) + ". Models: " + ", ".join(models) + "."),
              ("p", "Each cell: value [95% interval] (n = items measured). Rates are percentages. Intervals: "
                    "Wilson score for rates of 0/1 items, percentile bootstrap over items for means and for win "
                    "rates with ties, lm-eval's stderr for lm-eval tasks (each metric's method is under Settings). "
                    "↑ higher is better, ↓ lower is better. " + MISSING + ": not measured for that model.")]
    for bench in benches:
        per_model = _by_bench(results, bench, models)
        info = next(iter(per_model.values())).summary.get("benchmark") or {}
        blocks.append(("h", 2, f"Benchmark: {bench}"))
        count = info.get("count", info.get("selected"))  # rtune eval records the drawn sample as "selected"
        about = [info.get("description"), f"{count} items" if count is not None else None,
                 f"source: {info['source']}" if info.get("source") else None]
        if any(about):
            blocks.append(("p", "; ".join(a for a in about if a) + "."))
        refs = _bench_refs(per_model)
        rows = [[_row_title(name, next(iter(per.values())), refs)] + [format_metric(per.get(m)) for m in per_model]
                for name, per in _metric_rows(per_model)]
        blocks.append(("table", ["metric", *per_model], rows))
        name = f"metrics_{safe_name(bench)}.png"
        if name in figures:
            blocks.append(("img", name, figures[name]))
        blocks += _comparison_blocks(comparisons, bench)
    for name, heading in [("refusal.png", "Refusal vs over-refusal"), ("pairwise.png", "Pairwise comparison"),
                          ("aspects.png", "Aspect scores"), ("ranking.png", "Response ranking"),
                          ("lengths.png", "Output lengths")]:
        if name in figures:
            blocks += [("h", 2, heading), ("img", name, figures[name])]
    return blocks + human_blocks(eval_dirs, models) + _judges_blocks(results) + _settings_blocks(results, models)


# -- writing --------------------------------------------------------------------------------------
def _write_figures(results, models, benches, out: Path) -> dict[str, str]:
    """Draw and save every plot that has data; {file name: caption}."""
    colors = plots.model_colors(models)
    figures = {}

    def save(name: str, fig, caption: str) -> None:
        if fig is not None:
            plots.save_png(fig, out / name)
            figures[name] = caption

    for bench in benches:
        per_model = _by_bench(results, bench, models)
        refs = _bench_refs(per_model)
        every = _metric_rows(per_model)
        rows = [(n, {m: x for m, x in per.items() if x.get("value") is not None}) for n, per in every
                if _in_metrics_figure(n, refs)]
        save(f"metrics_{safe_name(bench)}.png",
             plots.metrics_figure(bench, list(per_model), [(n, per) for n, per in rows if per], colors),
             f"{bench}: every metric per model, with 95% intervals" if len(rows) == len(every) else
             f"{bench}: metrics per model, with 95% intervals (pairwise and aspect scores in figures of their own, "
             "judge bookkeeping counts in the table)")
    points = _refusal_points(results, models, benches)
    save("refusal.png", plots.refusal_figure(points, models, colors),
         "Refusal rate on harmful prompts against over-refusal rate on benign prompts, per model"
         + (" and judge" if len({p[4] for p in points}) > 1 else ""))
    pairwise = _pairwise_panels(results, models, benches)
    save("pairwise.png", plots.pairwise_figure(pairwise, models),
         "Wins, ties and losses against the reference per model, with the win rate's 95% interval (diamond) "
         "and the length-controlled win rate (triangle)")
    aspects = _aspect_panels(results, models, benches)
    save("aspects.png", plots.aspects_figure(aspects, models, colors),
         "The LLM judge's aspect scores (1-5) per model, with 95% intervals")
    groups = _ranking_groups(results, models, benches)
    save("ranking.png", plots.ranking_figure(groups, [m for m in models if any(m in g[1] for g in groups)], colors),
         "Response-ranking accuracy per model, with 95% intervals")
    lengths = {b: {m: _lengths(r) for m, r in _by_bench(results, b, models).items()} for b in benches}
    caps = {b: max((r.summary.get("decoding") or {}).get("max_new_tokens") or 0
                   for r in _by_bench(results, b, models).values()) or None for b in benches}
    save("lengths.png", plots.lengths_figure(lengths, caps, models, colors), "Output length in tokens per model")
    return figures


def build_report(eval_dirs: list, out_dir) -> Path:
    """Write report.md, report.html and the plots into out_dir; returns the path of report.md."""
    results, models, benches = load_results(eval_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(results, models, benches, out)
    blocks = _document(results, models, benches, eval_dirs, figures)
    write_text_atomic(out / "report.md", to_markdown(blocks))
    write_text_atomic(out / "report.html", to_html(blocks, out, TITLE))
    return out / "report.md"
