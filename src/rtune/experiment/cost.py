"""`rtune experiment GRID --dry-run`: the cells, what is already done, and what the rest will cost.

Nothing is downloaded, prepared or loaded. A cell's stages are looked up by their keys where the
inputs exist on disk (rtune.experiment.stages); a stage whose inputs do not exist yet is "to do".
The cost is an ESTIMATE, labelled so:
    training tokens   records x epochs x tokens per record. Records: the sample size, else the
                      source's published size; tokens per record: measured from a prepared file
                      (characters / 4) when there is one, else the rough figures in SOURCES.
    generations       prompts per evaluation x (cells + baselines); tokens at most max_new_tokens each.
    compute           for models in MODELS: 4 N tokens for LoRA training (forward 2N, backward to
                      the activations 2N: the base gets no weight gradients), 6 N for full fine-tuning,
                      2 N per generated token; GPU-hours at 40% of an H100's 989 TFLOP/s (bf16, dense).
"""

from __future__ import annotations

import json
from pathlib import Path

from rtune import run_folder
from rtune.experiment.grid import Grid

# Published sizes; characters per record (instruction + input + response) are rough estimates.
SOURCES = {
    "alpaca": {"records": 51_760, "chars": 520, "about": "yahma/alpaca-cleaned"},
    "dolly": {"records": 15_011, "chars": 840, "about": "databricks-dolly-15k (instruction, context, response)"},
    "lima": {"records": 1_000, "chars": 2_900, "about": "GAIR/lima, first 1,000 rows, two turns"},
    "alpaca-demo": {"records": 999, "chars": 800, "about": "alpaca_en_demo.json of llamafactory 0.9.5"},
}
# Parameters of the paper's bases (and the offline default), by the last part of the spec, lower case.
MODELS = {"llama-3.1-8b": 8.03e9, "gemma-2-9b": 9.24e9, "mistral-7b-v0.3": 7.25e9, "mistral-7b": 7.25e9,
          "gemma-2-2b": 2.61e9, "gemma-3-270m": 2.68e8, "smollm2-135m-instruct": 1.35e8}
# Items of the built-in benchmarks (for an eval.bench entry without ":N").
BENCH_SIZES = {"alpacaeval": 805, "justeval": 1000, "advbench": 520, "harmbench": 240, "strongreject": 313,
               "malicious-instruct": 100, "xstest": 450, "rtune-xs-safe": 67}
H100_BF16 = 989e12
MFU = 0.40
CHARS_PER_TOKEN = 4


def _params(model: str) -> float | None:
    name = Path(model.rstrip("/")).name.lower()
    return MODELS.get(name)


def _eval_prompts(grid: Grid) -> int:
    total = 0
    for spec in grid.eval.get("bench", []):
        name, _, n = str(spec).rpartition(":")
        size = int(n) if name and n.isdigit() else BENCH_SIZES.get(str(spec), 0)
        if grid.eval.get("limit") and not (name and n.isdigit()):
            size = min(size, int(grid.eval["limit"]))
        total += size
    return total + grid.holdout


def _records_and_chars(grid: Grid, source, out: Path) -> tuple[int, float, str]:
    from rtune.experiment.stages import prepared

    folder, _ = prepared(grid, source, out)
    train = folder / "train.jsonl"
    if train.is_file():
        rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines() if x.strip()]
        chars = sum(len(r.get("instruction", "")) + len(r["response"]) for r in rows) / max(1, len(rows))
        return len(rows), chars, "measured on the prepared file"
    known = SOURCES.get(source.spec)
    if known:
        records = min(source.size, known["records"]) if source.size else known["records"]
        return records, known["chars"], f"published size, estimated length ({known['about']})"
    return source.size or 0, 800.0, "unknown source: 800 characters per record assumed"


def _status(grid: Grid, cell, out: Path) -> dict:
    from rtune.experiment.stages import is_done, prepared, train_key

    folder, _ = prepared(grid, cell.source, out)
    status = {"prepared": is_done(folder), "trained": False, "evaluated": None}
    if not status["prepared"] or cell.refined or cell.refusals:
        return status  # later stages' inputs are not on disk yet (or need their own stages first)
    try:
        key, _ = train_key(grid, cell, folder / "train.jsonl")
    except Exception:  # noqa: BLE001 (a model that cannot be identified offline: not known to be done)
        return status
    status["trained"] = run_folder.run_is_complete(out / "runs" / key)
    return status


def plan(grid: Grid, out: Path) -> dict:
    """Print the cells with their status and the estimated cost; returns the same as a dict."""
    from rtune.experiment.stages import train_config

    cells = grid.cells()
    prompts = _eval_prompts(grid)
    max_new = int(grid.eval.get("max_new_tokens", 512))
    rows, total_tokens, total_flops = [], 0, 0.0
    for cell in cells:
        records, chars, basis = _records_and_chars(grid, cell.source, out)
        config = train_config(grid, cell.method)
        per_record = chars / CHARS_PER_TOKEN
        tokens = int((records + cell.refusals) * config.epochs * per_record)
        params = _params(cell.model)
        flops = params * tokens * (6 if config.peft == "none" else 4) if params else None
        total_tokens += tokens
        total_flops += flops or 0
        rows.append({"cell": cell.name, **_status(grid, cell, out), "train_tokens_estimate": tokens,
                     "train_flops_estimate": flops, "basis": basis})
    evaluations = len(cells) + len(grid.baselines) * len(grid.models) * len(grid.sources)
    generations = evaluations * prompts
    gen_flops = sum(2 * (_params(m) or 0) * max_new * prompts * (len(cells) // len(grid.models) + len(grid.baselines)
                                                               * len(grid.sources)) for m in grid.models)
    gpu_hours = (total_flops + gen_flops) / (H100_BF16 * MFU) / 3600
    print(f"{len(cells)} cells, {evaluations} evaluations of {prompts} prompts ({generations} generations, at most "
          f"{max_new} new tokens each)")
    for r in rows:
        done = "prepared" if r["prepared"] else "to prepare"
        done += ", trained" if r["trained"] else ""
        print(f"  {r['cell']}: {done}; ~{r['train_tokens_estimate']:,} training tokens ({r['basis']})")
    print(f"ESTIMATE: ~{total_tokens:,} training tokens; ~{gpu_hours:,.1f} H100 GPU-hours at {MFU:.0%} MFU "
          "(known model sizes only; 4 N per trained token with LoRA, 2 N per generated token; decoding is "
          "memory-bound, so real generation takes longer)")
    return {"cells": rows, "evaluations": evaluations, "prompts_per_evaluation": prompts, "generations": generations,
            "train_tokens_estimate": total_tokens, "gpu_hours_estimate": gpu_hours, "estimate": True}
