"""The stages of a cell, each keyed by the content of its inputs and skipped when its output exists.

    prepare   source, size, seed, holdout  -> OUT/data/prepared-<key>/{train,heldout}.jsonl
    refine    prepared data, refiner       -> OUT/data/refined-<key>/train.jsonl     (refined cells)
    mix       data, refusal source, N      -> OUT/data/mixed-<key>/train.jsonl       (N > 0)
    train     model, data, method, config  -> OUT/runs/<key>/                        (a run folder)
    evaluate  model or run, eval settings  -> OUT/evals/<key>/                       (rtune eval's layout)

A key is a hash of the stage's inputs: the content hash of the data it reads, the resolved settings
(training config without its bookkeeping fields: logging, checkpoints, dashboards) and the stage's
RESULTS_VERSION, which is bumped by hand when a change to rtune alters a stage's results. So a
re-run skips what is done, editing one axis of the grid re-runs only the cells it creates, and a
killed run resumes the stage it was in: training from its last checkpoint, evaluation from its
generation cache (shared by every evaluation of the grid: OUT/gen-cache). A stage is done when its
done.json exists, written atomically after its outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rtune import run_folder
from rtune.experiment.grid import Cell, Grid, Source
from rtune.io import sha256_file, write_json_atomic

# Bump a stage's version when a change to rtune alters that stage's results: its cells re-run.
RESULTS_VERSION = {"prepare": 1, "refine": 1, "mix": 1, "train": 1, "evaluate": 1, "compare": 1}
DONE = "done.json"


def stage_key(stage: str, inputs: dict) -> str:
    payload = {"stage": stage, "version": RESULTS_VERSION[stage], "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def mark_done(folder: Path, key: str, inputs: dict, **info) -> None:
    write_json_atomic(folder / DONE, {"key": key, "inputs": inputs, "time": run_folder.now(), **info})


@dataclass
class Counter:
    """What a run did, printed at the end: stages run vs found done."""

    ran: dict
    cached: dict

    @classmethod
    def new(cls) -> Counter:
        return cls({s: 0 for s in RESULTS_VERSION}, {s: 0 for s in RESULTS_VERSION})

    def add(self, stage: str, ran: bool) -> None:
        (self.ran if ran else self.cached)[stage] += 1


def _log(message: str) -> None:
    print(f"[experiment] {message}", flush=True)


# -- data -----------------------------------------------------------------------------------------
def prepared(grid: Grid, source: Source, out: Path) -> tuple[Path, dict]:
    inputs = {"source": source.spec, "size": source.size, "seed": grid.seed, "holdout": grid.holdout,
              "max_response_chars": grid.max_response_chars}
    if Path(source.spec).is_file():
        inputs["source_sha256"] = sha256_file(source.spec)
    key = stage_key("prepare", inputs)
    return out / "data" / f"prepared-{key}", {"key": key, "inputs": inputs}


def prepare_stage(grid: Grid, source: Source, out: Path, counter: Counter) -> Path:
    """The prepared folder: train.jsonl and (with holdout) heldout.jsonl."""
    from rtune.data import prepare

    folder, k = prepared(grid, source, out)
    ran = not is_done(folder)
    if ran:
        _log(f"prepare {source.name}")
        summary = prepare(source.spec, folder / "train.jsonl", limit=source.size, seed=grid.seed,
                          holdout=grid.holdout, max_response_chars=grid.max_response_chars)
        if grid.holdout:  # the benchmark is called "heldout" in every cell's results
            os.replace(folder / "train.heldout.jsonl", folder / "heldout.jsonl")
        mark_done(folder, k["key"], k["inputs"], summary=summary)
    counter.add("prepare", ran)
    return folder


def refine_stage(grid: Grid, data: Path, out: Path, counter: Counter) -> Path:
    from rtune.data.refine import RefineConfig, refine_file

    inputs = {"data_sha256": sha256_file(data / "train.jsonl"),
              "refiner": {k: v for k, v in grid.refiner.items() if k not in ("concurrency", "timeout")}}
    key = stage_key("refine", inputs)
    folder = out / "data" / f"refined-{key}"
    ran = not is_done(folder)
    if ran:
        _log(f"refine {data.name}")
        r = grid.refiner
        config = RefineConfig(url=r.get("url"), model=r.get("model"), local=r.get("local"), template=r.get("template"),
                              max_tokens=r.get("max_tokens", 2048), concurrency=r.get("concurrency", 8),
                              timeout=r.get("timeout", 300.0))
        summary = refine_file(data / "train.jsonl", folder / "train.jsonl", config)
        mark_done(folder, key, inputs, summary=summary)
    counter.add("refine", ran)
    return folder


def mix_stage(grid: Grid, data: Path, n: int, out: Path, counter: Counter) -> Path:
    from rtune.data import read_records
    from rtune.data.refusals import mix_refusals
    from rtune.io import write_jsonl_atomic

    # One mix serves every method: a refusal carries its instruction, which RT does not train on.
    method = "it" if "it" in grid.methods else "rt"
    inputs = {"data_sha256": sha256_file(data / "train.jsonl"), "refusals": grid.refusal_source,
              "filter": grid.refusal_filter, "n": n, "seed": grid.seed, "method": method}
    if Path(grid.refusal_source).is_file():
        inputs["refusals_sha256"] = sha256_file(grid.refusal_source)
    key = stage_key("mix", inputs)
    folder = out / "data" / f"mixed-{key}"
    ran = not is_done(folder)
    if ran:
        _log(f"mix {n} refusals ({grid.refusal_source}) into {data.name}")
        records, counts = mix_refusals(read_records(data / "train.jsonl"), grid.refusal_source, n, seed=grid.seed,
                                       filter=grid.refusal_filter, method=method)
        write_jsonl_atomic(folder / "train.jsonl", records)
        mark_done(folder, key, inputs, counts=counts)
    counter.add("mix", ran)
    return folder


def cell_data(grid: Grid, cell: Cell, out: Path, counter: Counter) -> tuple[Path, Path | None]:
    """(the cell's training file, its held-out file or None), running the data stages it needs."""
    prep = prepare_stage(grid, cell.source, out, counter)
    data = refine_stage(grid, prep, out, counter) if cell.refined else prep
    data = mix_stage(grid, data, cell.refusals, out, counter) if cell.refusals else data
    heldout = prep / "heldout.jsonl" if grid.holdout else None
    return data / "train.jsonl", heldout


# -- training -------------------------------------------------------------------------------------
def train_config(grid: Grid, method: str):
    from rtune.train.config import load_config

    values = {k: v for k, v in grid.train.items() if k != "config"}
    values.setdefault("seed", grid.seed)
    return load_config(grid.train.get("config"), {**values, "method": method})


def model_identity(spec: str) -> dict:
    """The base model's weights identity (rtune.fingerprint): a changed base re-trains its cells."""
    from rtune.fingerprint import weights_identity

    return weights_identity(spec)


def train_key(grid: Grid, cell: Cell, data_file: Path) -> tuple[str, dict]:
    from rtune.train.config import BOOKKEEPING_FIELDS

    config = train_config(grid, cell.method).to_dict()
    inputs = {"model": cell.model, "model_identity": model_identity(cell.model),
              "data_sha256": sha256_file(data_file),
              "config": {k: v for k, v in config.items() if k not in BOOKKEEPING_FIELDS}}
    return stage_key("train", inputs), inputs


def train_stage(grid: Grid, cell: Cell, data_file: Path, out: Path, counter: Counter,
                launcher=None) -> tuple[Path, str]:
    """The cell's run folder (trained, or resumed from its last checkpoint when a run was killed)."""
    from rtune.train.recipe import train

    key, inputs = train_key(grid, cell, data_file)
    folder = out / "runs" / key
    ran = not run_folder.run_is_complete(folder)
    if ran:
        resume = run_folder.is_run_dir(folder)
        _log(f"train {cell.name}" + (" (resuming)" if resume else ""))
        if launcher is not None:  # e.g. accelerate launch on a multi-GPU node
            launcher(cell.model, data_file, folder, train_config(grid, cell.method), resume)
        else:
            train(cell.model, str(data_file), str(folder), train_config(grid, cell.method), resume=resume)
        write_json_atomic(folder / "experiment_cell.json", {"cell": cell.to_dict(), "key": key, "inputs": inputs})
    counter.add("train", ran)
    return folder, key


# -- evaluation -----------------------------------------------------------------------------------
def eval_config(grid: Grid, heldout: Path | None):
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.run import EvalConfig

    e = grid.eval
    decoding = EvalDecoding(**{k: e[k] for k in ("max_new_tokens", "batch_size", "dtype") if k in e},
                            stop=list(e.get("stop", [])))
    benches = [str(b) for b in e.get("bench", [])] + ([str(heldout)] if heldout else [])
    config = EvalConfig(benches=benches, limit=e.get("limit"), seed=grid.seed, decoding=decoding,
                        **{k: e[k] for k in ("ranking_k", "shift", "relevance", "lm_eval_dtype") if k in e})
    config.lm_eval_tasks = [str(t) for t in e.get("lm_eval_tasks", [])]
    if e.get("judge_url"):
        from rtune.eval.judging import JudgeConfig

        config.judge = JudgeConfig(e["judge_url"], e["judge_model"], kinds=list(e.get("judge", ["refusal", "aspects"])),
                                   concurrency=e.get("judge_concurrency", 8), timeout=e.get("judge_timeout", 120.0))
    return config


def eval_stage(grid: Grid, spec: str, label: str, template: str | None, identity: dict, heldout: Path | None,
               out: Path, counter: Counter, rules: bool = False) -> Path:
    """Evaluate one model (a cell's run, or a baseline) into its own folder; generations shared grid-wide."""
    from rtune.eval.run import run_eval

    inputs = {"model": identity, "label": label, "template": template, "rules": rules, "eval": grid.eval,
              "seed": grid.seed, "heldout_sha256": sha256_file(heldout) if heldout else None}
    key = stage_key("evaluate", inputs)
    folder = out / "evals" / key
    ran = not is_done(folder)
    if ran:
        _log(f"evaluate {label}")
        shared = out / "gen-cache"
        shared.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "cache").exists():  # the same model on the same prompts is generated once per grid
            os.symlink(os.path.relpath(shared, folder), folder / "cache")
        config = eval_config(grid, heldout)
        if rules:  # the rule-based adapter with its default strengths (rtune.infer.rules)
            from rtune.infer.rules import RulesConfig

            config.decoding.rules = RulesConfig.parse("eos,uniform,diversity")
        run_eval([spec], config, folder, labels=[label], templates=[template])
        mark_done(folder, key, inputs)
    counter.add("evaluate", ran)
    return folder


def baseline_spec(name: str) -> tuple[str | None, bool]:
    """(in-context template or None, with rules) of a baseline name such as base+urial-r."""
    parts = name.split("+")[1:]
    rules = "rules" in parts
    template = next((p for p in parts if p != "rules"), None)
    return template, rules


# -- one cell ----------------------------------------------------------------------------------------
def run_cell(grid_path: str, cell: dict, out: str, launcher=None) -> dict:
    """Prepare, train and evaluate one cell (the unit of work of an executor); returns its record."""
    from rtune.experiment.grid import load_grid

    grid = load_grid(grid_path)
    out = Path(out)
    c = Cell(cell["model"], next(s for s in grid.sources if s.spec == cell["source"] and s.size == cell["size"]),
             cell["method"], cell["refusals"], cell["refined"])
    counter = Counter.new()
    data_file, heldout = cell_data(grid, c, out, counter)
    run_dir, train_key = train_stage(grid, c, data_file, out, counter, launcher)
    eval_dir = eval_stage(grid, str(run_dir), c.method, None, {"train_key": train_key}, heldout, out, counter)
    return {"name": c.name, "cell": c.to_dict(), "data": str(data_file), "run_dir": str(run_dir),
            "train_key": train_key, "eval_dir": str(eval_dir), "eval_key": eval_dir.name,
            "counts": {"ran": counter.ran, "cached": counter.cached}}
