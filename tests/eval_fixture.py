"""A small `rtune eval` folder written by hand: answers whose text says which model wrote them."""

import json
from pathlib import Path

from rtune.eval.results import metric, write_result


def answer(model: str, bench: str, item: int) -> str:
    return f"{model} answers {bench} item {item}"


def write_eval_dir(root: Path, models=("base", "rt", "it"), benches=("alpaca-heldout",), n: int = 6,
                   preferences: dict | None = None) -> Path:
    """EVAL_DIR with results/<model>/<bench>/{items,summary}; preferences: {(model, ref): [per-item
    preference of model against ref, alpaca_eval's 1..2]} as an LLM pairwise judge leaves them."""
    for model in models:
        for bench in benches:
            rows = []
            for i in range(n):
                row = {"id": str(i), "prompt": f"Instruction {i} of {bench}", "output": answer(model, bench, i),
                       "finish_reason": "eos", "num_tokens": 5, "harmful": None,
                       "judgments": {"keyword-v1": "compliance"}, "values": {}}
                for (judged, ref), prefs in (preferences or {}).items():
                    if judged == model:
                        row["judgments"].setdefault("judge-llm", {})[f"preference_vs_{ref}"] = prefs[i]
                rows.append(row)
            summary = {"model": {"label": model, "spec": f"runs/{model}"}, "benchmark": {"name": bench, "selected": n},
                       "metrics": {"answered": metric(1.0, (0.6, 1.0), n, "rate", "answered", True)}}
            write_result(root, model, bench, rows, summary)
    (root / "eval.json").write_text(json.dumps({"models": {m: {"spec": f"runs/{m}"} for m in models}}))
    return root
