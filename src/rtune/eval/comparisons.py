"""Paired differences between models on the same items: EVAL_DIR/comparisons.json.

RT and IT answer the very same prompts, so their difference is measured per item and its interval
is a paired one (rtune.eval.metrics.intervals.paired_difference: Newcombe's paired score interval
for 0/1 values, a paired bootstrap for others). Two separate intervals that overlap say little
about the difference; the paired interval says how sure the difference is.

For every benchmark and every pair of models (A listed before B in the evaluation), on the items
both answered, each per-item value below gives {"value": mean(A - B), "ci", "n", "ci_method"}.
The file is recomputed from results/*/*/items.jsonl after every `rtune eval`, so it always covers
every model in the folder; `rtune report` shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rtune.eval.metrics.intervals import paired_difference
from rtune.eval.results import EVAL_INFO, read_items
from rtune.io import write_json_atomic

COMPARISONS = "comparisons.json"

# (key, label, where it comes from); the per-item values rtune.eval.run writes under "values".
PAIRED_VALUES = (
    ("rouge_l", "ROUGE-L F1 against the reference"),
    ("reference_similarity", "similarity to the reference (MiniLM)"),
    ("answered", "answered (heuristic)"),
    ("ends_with_eos", "ends with EOS"),
    ("writes_instruction", "writes an instruction"),
    ("ranking_top1", "response ranking top-1"),
    ("nll_given_instruction", "reference NLL given the instruction"),
    ("nll_gain", "NLL gain from the instruction"),
    ("relevance", "relevance (MiniLM)"),
    ("length_tokens", "length (tokens)"),
)


def _item_values(row: dict) -> dict:
    """The comparable per-item values of one items.jsonl row, refusal judgments included."""
    values = {k: row.get("values", {}).get(k) for k, _ in PAIRED_VALUES}
    values = {k: (float(v) if isinstance(v, (bool, int, float)) else None) for k, v in values.items()}
    group = {True: "refusal", False: "over_refusal"}.get(row.get("harmful"))
    for judge, label in (row.get("judgments") or {}).items():
        if group is None or not isinstance(label, str):
            continue
        name = f"{group}_keyword" if judge.startswith("keyword") else f"{group}_llm"
        # An unclassified LLM judgment is neither: the pair is left out rather than guessed.
        values[name] = {"refusal": 1.0, "compliance": 0.0}.get(label)
    return values


# The 0/1 statistics (Newcombe's paired interval); the rest are scores (paired bootstrap).
BINARY = {"answered", "ends_with_eos", "writes_instruction", "ranking_top1", "refusal_keyword",
          "over_refusal_keyword", "refusal_llm", "over_refusal_llm"}

LABELS = dict(PAIRED_VALUES) | {
    "refusal_keyword": "refusal rate on harmful prompts (keyword heuristic)",
    "over_refusal_keyword": "over-refusal on benign prompts (keyword heuristic)",
    "refusal_llm": "refusal rate on harmful prompts (LLM judge)",
    "over_refusal_llm": "over-refusal on benign prompts (LLM judge)",
}


def compare_rows(rows_a: list[dict], rows_b: list[dict], seed: int = 0) -> dict:
    """{value key: {"value", "ci", "n", "ci_method", "label"}}: A - B over the items (by id) both answered."""
    a = {str(r["id"]): _item_values(r) for r in rows_a}
    b = {str(r["id"]): _item_values(r) for r in rows_b}
    ids = [k for k in a if k in b]
    keys = sorted({k for v in a.values() for k in v} & {k for v in b.values() for k in v})
    out = {}
    for key in keys:
        d = paired_difference([a[i].get(key) for i in ids], [b[i].get(key) for i in ids], seed=seed,
                              binary=key in BINARY)
        if d is not None:
            out[key] = {**d, "label": LABELS.get(key, key)}
    return out


def compare(eval_dir: str | Path, seed: int = 0) -> dict:
    """{bench: {"A - B": {value key: {"value", "ci", "n", "ci_method", "label"}}}} over the folder's results."""
    eval_dir = Path(eval_dir)
    info = json.loads((eval_dir / EVAL_INFO).read_text(encoding="utf-8")) if (eval_dir / EVAL_INFO).is_file() else {}
    order = list(info.get("models", {}))
    found: dict = {}  # bench -> model -> items.jsonl rows
    for items_file in sorted((eval_dir / "results").glob("*/*/items.jsonl")):
        model, bench = items_file.parent.parent.name, items_file.parent.name
        if bench == "lm-eval":
            continue
        found.setdefault(bench, {})[model] = read_items(items_file.parent)
    out: dict = {}
    for bench, models in sorted(found.items()):
        names = sorted(models, key=lambda m: (order.index(m) if m in order else len(order), m))
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pair = compare_rows(models[a], models[b], seed)
                if pair:
                    out.setdefault(bench, {})[f"{a} - {b}"] = pair
    return out


def write_comparisons(eval_dir: str | Path, seed: int = 0) -> Path:
    path = Path(eval_dir) / COMPARISONS
    write_json_atomic(path, {"about": "paired differences A - B on the items both models answered; "
                                      "see rtune.eval.comparisons", "comparisons": compare(eval_dir, seed)})
    return path
