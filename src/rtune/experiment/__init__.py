"""Experiments: a grid of models x data x sizes x methods x refusal mixtures x refinement, run, compared
and reported beside the paper's figures (`rtune experiment GRID.yaml`).

    grid.py        the grid file and its cells
    stages.py      prepare, refine, mix, train, evaluate: each keyed by its inputs, skipped when done
    executors.py   cells here one after another, or as SLURM jobs (submitit)
    compare.py     RT vs IT and refined vs original, paired on the same items and judged
    cost.py        --dry-run: what is done and what the rest will cost (estimates)
    report.py      the reproduction report (paper_results.json: the paper's figures)
    run.py         run_experiment: all of it in order
"""

from rtune.experiment.run import run_experiment

__all__ = ["run_experiment"]
