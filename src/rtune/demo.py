"""`rtune demo`: the whole path on the offline default, sized for a 2-core laptop CPU.

prepare alpaca-demo -> train RT and IT on the same responses -> `rtune eval` of the base, RT and
IT models and of the untrained baseline "base+urial-r" (the base weights prompted in context with
the answers of rtune's own demonstrations), on the held-out instructions (also a response-ranking
set) and small AdvBench and HarmBench samples -> `rtune report` -> a side-by-side file and a table.

Every step writes its output atomically and is skipped when that output already exists, so an
interrupted demo continues where it stopped when run again (training resumes from its last
checkpoint, evaluation from its generation cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rtune import run_folder
# The answer heuristics live with the other generation statistics; still importable from here.
from rtune.eval.metrics.generation import (  # noqa: F401
    INSTRUCTION_OPENERS,
    is_answer,
    repeats_instruction,
    writes_instruction,
)
from rtune.io import write_json_atomic, write_jsonl_atomic, write_text_atomic


@dataclass
class DemoConfig:
    out_dir: str = "rtune-demo"
    model: str = "gemma-3-270m"
    source: str = "alpaca-demo"
    seed: int = 0
    train_size: int = 256  # responses shared by RT and IT
    eval_size: int = 24  # held-out instructions answered by every model (a plain random sample)
    # Chosen by measurement on a 2-core CPU (docs/results.md, "The demo"): many short responses teach the
    # 270M base model to answer and to stop within the time budget; every one keeps its EOS.
    # At lr 5e-4 RT mostly wrote a new instruction instead of an answer; 2e-3 made it answer.
    max_response_chars: int = 800
    epochs: float = 4
    lr: float = 2e-3
    max_length: int = 320
    # The cpu preset's steps (2 x 4 length-grouped micro-batches), each step's 8 sequences run as one
    # padding-free packed row (fuse_steps): the same optimiser steps, 1.5x faster on the demo's short
    # sequences than four small passes (docs/performance.md).
    fuse_steps: bool = True
    max_new_tokens: int = 192
    save_steps: int = 16
    safety_size: int = 16  # AdvBench and HarmBench prompts each model answers (seeded samples)
    eval_batch_size: int = 24  # measured: 24 beat 56 (one batch) on 2 cores; a batch runs until its longest answer ends
    ranking_k: int = 3  # other responses each held-out reference is ranked against (the time budget)


# The demo's held-out table, least flattering first: content against the reference, then ranking,
# then the format heuristics (which count "1. Daisy 2. Orange 3. Apple" as an answer to a question
# about tropical flowers).
TABLE_METRICS = (
    ("rouge_l", "ROUGE-L vs reference"),
    ("reference_similarity", "similarity to reference (MiniLM)"),
    ("ranking_top1", "ranking top-1"),
    ("answered", "answered (heuristic)"),
    ("cut_at_length", "cut at max tokens"),
    ("writes_instruction", "writes an instruction"),
    ("length_tokens", "mean tokens"),
)


def summarise(summary: dict) -> dict:
    """The held-out metrics the demo shows, from one model's eval summary (value, interval, n, method)."""
    metrics = summary["metrics"]
    return {key: metrics[key] for key, _ in TABLE_METRICS if key in metrics}


def table(summary: dict) -> str:
    """Markdown: one row per model, one column per TABLE_METRICS entry, each value with its 95% interval."""
    from rtune.report.tables import format_metric

    keys = [(k, title) for k, title in TABLE_METRICS if any(k in s for s in summary.values())]
    lines = ["| model | " + " | ".join(title for _, title in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, s in summary.items():
        cells = [format_metric({**s[k], "n": None}) if k in s else "—" for k, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = max((m.get("n") or 0 for s in summary.values() for m in s.values()), default=0)
    lines += ["", f"{n} held-out instructions; 95% intervals (Wilson for rates, bootstrap for means). ROUGE-L and "
                  "similarity compare each answer with the held-out reference response; 'answered' is a format "
                  "heuristic (ends, neither echoes nor writes an instruction): read side_by_side.jsonl."]
    return "\n".join(lines)


def _train_child(model, train_file, run_dir, train_config, resume) -> None:
    from rtune.train.recipe import train

    train(model, train_file, run_dir, train_config, resume=resume)


def train_in_child(model: str, train_file: Path, run_dir: Path, train_config, resume: bool) -> None:
    """`rtune.train.recipe.train` in a fresh process: the memory a training run used is returned to the
    system when it ends (one process holding training then evaluation peaked ~2 GB higher, allocator
    fragmentation), so the demo's peak is that of its largest stage, not of their sum."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(model, str(train_file), str(run_dir), train_config, resume), daemon=True)
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():  # the parent was interrupted: do not leave a trainer running
            child.terminate()
            child.join()
    if child.exitcode != 0:
        from rtune.errors import RtuneError

        raise RtuneError(f"training {run_dir} failed (exit code {child.exitcode}); its error is printed above. "
                           "Run the demo again to continue from its last checkpoint.")


def run_demo(config: DemoConfig) -> dict:
    from rtune.data import prepare
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.results import SUMMARY, read_items, result_dir
    from rtune.eval.run import EvalConfig, run_eval
    from rtune.report import build_report
    from rtune.train.config import load_config

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()

    def step(name: str, done: Path, fn) -> None:
        if done.exists():
            print(f"[demo] {name}: already done ({done})")
            return
        print(f"[demo] {name} ...", flush=True)
        t = time.time()
        fn()
        timings[name] = round(time.time() - t, 1)
        print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)

    train_file, heldout_file = out / "data" / "train.jsonl", out / "data" / "train.heldout.jsonl"
    step(
        "prepare data",
        train_file,
        lambda: prepare(config.source, train_file, limit=config.train_size, seed=config.seed,
                        holdout=config.eval_size, max_response_chars=config.max_response_chars),
    )

    train_config = load_config(
        "cpu",
        {
            "epochs": config.epochs,
            "lr": config.lr,
            "max_length": config.max_length,
            "packing": config.fuse_steps,
            "fuse_steps": config.fuse_steps,
            "save_steps": config.save_steps,
            "seed": config.seed,
        },
    )
    for method in ("rt", "it"):
        run_dir = out / "runs" / method
        train_config.method = method
        if run_folder.run_is_complete(run_dir):
            print(f"[demo] train {method.upper()}: already done ({run_dir})")
            continue
        print(f"[demo] train {method.upper()} on {config.train_size} responses ...", flush=True)
        t = time.time()
        # An interrupted run continues from its last checkpoint (a finished one is skipped above).
        train_in_child(config.model, train_file, run_dir, train_config, resume=run_folder.is_run_dir(run_dir))
        timings[f"train {method}"] = round(time.time() - t, 1)

    # Evaluation: cached and resumable, so a second demo run regenerates nothing.
    t = time.time()
    benches = [str(heldout_file), f"advbench:{config.safety_size}", f"harmbench:{config.safety_size}"]
    eval_config = EvalConfig(benches=benches, seed=config.seed, ranking_k=config.ranking_k,
                             decoding=EvalDecoding(max_new_tokens=config.max_new_tokens,
                                                   batch_size=config.eval_batch_size))
    models = {"base": config.model, "rt": str(out / "runs" / "rt"), "it": str(out / "runs" / "it"),
              "base+urial-r": config.model}  # the untrained baseline: the base weights, prompted in context
    print(f"[demo] evaluate base, RT, IT and base+urial-r on {', '.join(benches)} ...", flush=True)
    run_eval(list(models.values()), eval_config, out / "eval", labels=list(models),
             templates=[None, None, None, "urial-r"])
    timings["evaluate"] = round(time.time() - t, 1)
    report_md = build_report([out / "eval"], out / "report")

    heldout = {name: read_items(result_dir(out / "eval", name, heldout_file.stem)) for name in models}
    summary = {name: summarise(json.loads((result_dir(out / "eval", name, heldout_file.stem) / SUMMARY)
                                          .read_text(encoding="utf-8"))) for name in models}
    side_by_side = [
        {"id": rows[0]["id"], "instruction": rows[0]["prompt"],
         **{f"{name}_output": heldout[name][i]["output"] for name in models},
         **{f"{name}_finish_reason": heldout[name][i]["finish_reason"] for name in models}}
        for i, rows in enumerate(zip(*heldout.values()))
    ]
    write_jsonl_atomic(out / "side_by_side.jsonl", side_by_side)
    report = {
        "config": asdict(config),
        "summary": summary,
        "timings_s": timings,
        "total_s": round(time.time() - start, 1),
    }
    write_json_atomic(out / "summary.json", report)
    text = table(summary)
    write_text_atomic(out / "summary.md", text + "\n")
    print("\n" + text)
    print(f"\nreport: {report_md} (and report.html); side-by-side answers: {out / 'side_by_side.jsonl'}; "
          f"total {report['total_s']:.0f} s")
    return report
