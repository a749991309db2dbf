"""The comparison stage: cells paired on the same items (RT vs IT, refined vs original), cached.

For each pair, on every benchmark both cells answered: the paired differences of the judge-free
per-item values (rtune.eval.comparisons.compare_rows: Newcombe's interval for 0/1 values, a paired
bootstrap for others) and, when the grid names a judge, the pairwise LLM judge with the second cell
as the reference (both presentation orders; rtune.eval.judging), on benchmarks without harmful
items. Each pair's result is one JSON file keyed by both evaluations and the judge settings, so a
re-run asks nothing again (and the judge client caches every judgment as it arrives).
"""

from __future__ import annotations

import json
from pathlib import Path

from rtune.eval.comparisons import compare_rows
from rtune.eval.results import read_items, read_summaries, safe_name
from rtune.experiment.stages import Counter, is_done, mark_done, stage_key


def _rows(eval_dir: Path) -> dict[str, list[dict]]:
    """{benchmark: items.jsonl rows} of the one model in an evaluation folder."""
    out = {}
    for summary in read_summaries(eval_dir):
        bench = summary["benchmark"]["name"]
        if bench != "lm-eval":
            out[bench] = read_items(summary["_dir"])
    return out


def _judge_pairwise(grid, a_rows: dict, b_rows: dict, out: Path) -> dict:
    """{bench: pairwise metrics of A against B} by the grid's judge, on benchmarks without harmful items."""
    from rtune.eval.benchmarks import Item
    from rtune.eval.judging import JudgeConfig, run_judges

    e = grid.eval
    data: dict = {"a": {}, "b": {}}
    for bench in a_rows:
        if bench not in b_rows or any(r.get("harmful") for r in a_rows[bench]):
            continue
        common = {str(r["id"]) for r in a_rows[bench]} & {str(r["id"]) for r in b_rows[bench]}
        for name, rows in (("a", a_rows[bench]), ("b", b_rows[bench])):
            kept = [r for r in rows if str(r["id"]) in common]
            data[name][bench] = {
                "items": [Item(str(r["id"]), r["prompt"], r.get("reference"), r.get("harmful"), r.get("subset") or "")
                          for r in kept],
                "rows": [{"id": str(r["id"]), "output": r["output"]} for r in kept]}
    if not any(data["a"].values()):
        return {}
    config = JudgeConfig(e["judge_url"], e["judge_model"], kinds=["pairwise"], reference="b",
                         concurrency=e.get("judge_concurrency", 8), timeout=e.get("judge_timeout", 120.0))
    judged = run_judges(config, data, out, 0, True)
    return {bench: found["metrics"] for bench, found in judged["a"].items()} | {"_stats": judged["_stats"]}


def compare_pair(grid, kind: str, a: dict, b: dict, out: Path, counter: Counter) -> Path:
    """Compare cell a with cell b (their records from rtune.experiment.run); returns the result file."""
    judge = {k: grid.eval.get(k) for k in ("judge_url", "judge_model")} if grid.eval.get("judge_url") else None
    inputs = {"kind": kind, "a": a["eval_key"], "b": b["eval_key"], "judge": judge and judge["judge_model"],
              "seed": grid.seed}
    key = stage_key("compare", inputs)
    folder = out / "comparisons" / key
    ran = not is_done(folder)
    if ran:
        print(f"[experiment] compare {a['name']} with {b['name']}", flush=True)
        a_rows, b_rows = _rows(Path(a["eval_dir"])), _rows(Path(b["eval_dir"]))
        paired = {bench: compare_rows(a_rows[bench], b_rows[bench], grid.seed) for bench in a_rows if bench in b_rows}
        judged = _judge_pairwise(grid, a_rows, b_rows, folder) if judge else {}
        result = {"kind": kind, "a": {k: a[k] for k in ("name", "cell")}, "b": {k: b[k] for k in ("name", "cell")},
                  "paired": paired, "judged": {k: v for k, v in judged.items() if k != "_stats"},
                  "judge_stats": judged.get("_stats"), "judge": judge and {"model": judge["judge_model"]}}
        from rtune.io import write_json_atomic

        write_json_atomic(folder / "comparison.json", result)
        mark_done(folder, key, inputs)
    counter.add("compare", ran)
    return folder / "comparison.json"


def pairs(records: list[dict]) -> list[tuple[str, dict, dict]]:
    """(kind, a, b): RT (and rt-empty-user) vs IT, and refined vs original, on otherwise equal cells."""
    def axes(cell: dict, **change) -> tuple:
        c = {**cell, **change}
        return (c["model"], c["source"], c["size"], c["method"], c["refusals"], c["refined"])

    by_axes = {axes(r["cell"]): r for r in records}
    out = []
    for r in records:
        c = r["cell"]
        if c["method"] != "it" and axes(c, method="it") in by_axes:
            out.append(("method", r, by_axes[axes(c, method="it")]))
        if c["refined"] and axes(c, refined=False) in by_axes:
            out.append(("refined", r, by_axes[axes(c, refined=False)]))
    return out


def read_comparison(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def judged_metric(comparison: dict, bench: str, name: str, reference: str = "b") -> dict | None:
    """A pairwise metric of a comparison (e.g. "win_rate") on a benchmark, or None."""
    return (comparison.get("judged", {}).get(bench) or {}).get(f"vs_{safe_name(reference)}_{name}")
