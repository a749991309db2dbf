"""`rtune experiment GRID.yaml`: every cell of a grid prepared, trained and evaluated, then compared and reported.

    OUT/grid.json        the grid as read (and the grid file's hash)
    OUT/data/            prepared, refined and mixed training data (rtune.experiment.stages)
    OUT/runs/<key>/      one run folder per trained cell
    OUT/evals/<key>/     one evaluation folder per cell and per baseline (rtune eval's layout)
    OUT/gen-cache/       the generation cache all evaluations share
    OUT/comparisons/     RT vs IT and refined vs original, paired and judged (rtune.experiment.compare)
    OUT/cells.json       which folder holds what, per cell and baseline
    OUT/report/          the reproduction report (rtune.experiment.report)

Cells run one after another (`--executor local`) or as SLURM jobs through submitit
(`--executor slurm`, rtune.experiment.executors); comparisons and the report follow, locally.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rtune.experiment.grid import Grid, load_grid
from rtune.experiment.stages import Counter, baseline_spec, eval_stage, model_identity, prepare_stage
from rtune.io import write_json_atomic


def run_baselines(grid: Grid, out: Path, counter: Counter) -> list[dict]:
    """Every baseline (untuned base, in-context formats) of every model, on each source's held-out set."""
    records = []
    for model in grid.models:
        for source in grid.sources:
            if not grid.baselines:
                break
            heldout = prepare_stage(grid, source, out, counter) / "heldout.jsonl" if grid.holdout else None
            for name in grid.baselines:
                template, rules = baseline_spec(name)
                identity = {"spec": model, "weights": model_identity(model)}
                folder = eval_stage(grid, model, name, template, identity, heldout, out, counter, rules=rules)
                records.append({"name": f"{Path(model).name}_{source.name}_{name}", "baseline": name, "model": model,
                                "source": source.spec, "size": source.size, "eval_dir": str(folder),
                                "eval_key": folder.name})
    return records


def grid_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_experiment(grid_path: str | os.PathLike, out: str | os.PathLike, *, executor: str = "local",
                   paper: bool = False, dry_run: bool = False) -> dict:
    """Run (or with dry_run, plan) a grid; returns {"cells", "baselines", "comparisons", "counts", "report"}."""
    from rtune.experiment import compare, executors
    from rtune.experiment.cost import plan

    grid = load_grid(grid_path)
    out = Path(out)
    cells = grid.cells()
    if dry_run:
        return plan(grid, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "grid.json", {"path": str(grid_path), "sha256": grid_digest(str(grid_path)),
                                          "grid": grid.to_dict(), "cells": [c.to_dict() for c in cells]})
    print(f"[experiment] {len(cells)} cells, {len(grid.baselines) * len(grid.models) * len(grid.sources)} "
          f"baseline evaluations, executor {executor}", flush=True)
    records = executors.run_cells(executor, str(grid_path), [c.to_dict() for c in cells], str(out), grid.slurm)
    counter = Counter.new()
    for r in records:  # the cells' own counts (they may have run in other processes)
        for stage, n in r["counts"]["ran"].items():
            counter.ran[stage] += n
        for stage, n in r["counts"]["cached"].items():
            counter.cached[stage] += n
    baselines = run_baselines(grid, out, counter)
    comparisons = [{"kind": kind, "a": a["name"], "b": b["name"],
                    "file": str(compare.compare_pair(grid, kind, a, b, out, counter))}
                   for kind, a, b in compare.pairs(records)]
    index = {"cells": records, "baselines": baselines, "comparisons": comparisons}
    write_json_atomic(out / "cells.json", index)
    from rtune.experiment.report import build_reproduction_report

    report = build_reproduction_report(out, out / "report", paper=paper)
    counts = {"ran": counter.ran, "cached": counter.cached}
    done = ", ".join(f"{stage} {counter.ran[stage]} run / {counter.cached[stage]} cached" for stage in counter.ran)
    print(f"[experiment] {done}", flush=True)
    print(f"[experiment] report: {report}", flush=True)
    return {**index, "counts": counts, "report": str(report)}
