"""The results layout of `rtune eval`, read by `rtune report`.

    EVAL_DIR/eval.json                          the settings of the last `rtune eval` into this folder
    EVAL_DIR/cache/<fingerprint>/<decoding>.jsonl   generations, one line per item, appended as made
    EVAL_DIR/results/<model>/<bench>/items.jsonl    one row per item: prompt, output, per-item values
    EVAL_DIR/results/<model>/<bench>/summary.json   every metric with its interval, and all that makes
                                                    the number repeatable (model fingerprint, data
                                                    source and hash, decoding, judges, versions, timings)

A metric in a summary is {"value", "ci": [low, high] or null, "n", "kind": "rate" | "mean",
"label", "higher_is_better": true | false | null, "judge": name or null, "ci_method": how the
interval was made}. Rates are shares in [0, 1]; intervals are 95%, Wilson for rates of 0/1 items and
bootstrap for means (rtune.eval.metrics.intervals).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rtune.errors import RtuneError
from rtune.io import write_json_atomic, write_jsonl_atomic

EVAL_INFO = "eval.json"
SUMMARY = "summary.json"
ITEMS = "items.jsonl"


def safe_name(text: str) -> str:
    """A folder name for a model label or a benchmark name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def result_dir(eval_dir: str | Path, model_label: str, bench: str) -> Path:
    return Path(eval_dir) / "results" / safe_name(model_label) / safe_name(bench)


def metric(value, ci=None, n: int = 0, kind: str = "mean", label: str = "", higher_is_better=None,
           judge: str | None = None, ci_method: str | None = None) -> dict:
    return {"value": value, "ci": list(ci) if ci is not None else None, "n": n, "kind": kind, "label": label,
            "higher_is_better": higher_is_better, "judge": judge, "ci_method": ci_method if ci is not None else None}


def write_result(eval_dir: str | Path, model_label: str, bench: str, rows: list[dict], summary: dict) -> Path:
    """Per-item rows and the summary, each written atomically (items first: a summary means complete)."""
    folder = result_dir(eval_dir, model_label, bench)
    write_jsonl_atomic(folder / ITEMS, rows)
    write_json_atomic(folder / SUMMARY, summary)
    return folder


def read_summaries(eval_dir: str | Path) -> list[dict]:
    """Every summary under EVAL_DIR/results, each with "_dir" (its folder), in a stable order."""
    root = Path(eval_dir) / "results"
    if not root.is_dir():
        raise RtuneError(f"{eval_dir} holds no rtune eval results (no {root})")
    out = []
    for path in sorted(root.glob(f"*/*/{SUMMARY}")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RtuneError(f"{path}: not valid JSON: {e}") from None
        out.append({**summary, "_dir": str(path.parent)})
    if not out:
        raise RtuneError(f"{eval_dir} holds no finished results ({root}/*/*/{SUMMARY})")
    return out


def read_items(result_folder: str | Path) -> list[dict]:
    path = Path(result_folder) / ITEMS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
