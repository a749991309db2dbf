"""Where the cells of a grid run: here, one after another, or as SLURM jobs through submitit.

    local   run_cell for each cell in this process, in grid order.
    slurm   one submitit job per cell (submitit: the launcher the field uses; `pip install
            "rtune[slurm]"`), with the grid's `slurm:` block as the job's resources (partition,
            gpus_per_node, cpus_per_task, mem_gb, timeout_min, account, qos, constraint). A cell whose
            node has several GPUs trains under `accelerate launch` (one process per GPU, DDP); its
            evaluation runs in the job after training. Jobs write their stages' outputs under the
            experiment folder (a shared file system), so a re-submitted grid skips what any job
            finished. `submitit_cluster="local"` runs the very same jobs as local subprocesses (how
            the tests exercise this path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rtune.errors import RtuneError

EXECUTORS = ("local", "slurm")


def run_cells(executor: str, grid_path: str, cells: list[dict], out: str, slurm: dict,
              submitit_cluster: str | None = None) -> list[dict]:
    from rtune.experiment.stages import run_cell

    if executor == "local":
        return [run_cell(grid_path, cell, out) for cell in cells]
    if executor == "slurm":
        return _run_submitit(grid_path, cells, out, slurm, submitit_cluster)
    raise RtuneError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")


def accelerate_launcher(processes: int):
    """A train_stage launcher that runs `rtune train` under `accelerate launch` with one process per GPU."""
    def launch(model: str, data_file: Path, run_dir: Path, config, resume: bool) -> None:
        from rtune.train.config import config_to_yaml

        config_file = Path(f"{run_dir}.config.yaml")
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(config_to_yaml(config), encoding="utf-8")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "-m", "rtune", "train", "--model", model, "--data", str(data_file), "--out", str(run_dir),
               "--config", str(config_file)] + (["--resume"] if resume else [])
        subprocess.run(cmd, check=True)

    return launch


def _job(grid_path: str, cell: dict, out: str, gpus: int) -> dict:
    """One SLURM job: a cell, trained under accelerate launch when the node has several GPUs."""
    from rtune.experiment.stages import run_cell

    return run_cell(grid_path, cell, out, launcher=accelerate_launcher(gpus) if gpus > 1 else None)


def _run_submitit(grid_path: str, cells: list[dict], out: str, slurm: dict, cluster: str | None) -> list[dict]:
    try:
        import submitit
    except ImportError:
        raise RtuneError("--executor slurm needs submitit: pip install 'rtune[slurm]'") from None
    folder = Path(out) / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    gpus = int(slurm.get("gpus_per_node", 0) or 0)
    params = {"timeout_min": int(slurm.get("timeout_min", 60 * 24)), "name": "rtune-cell",
              "cpus_per_task": int(slurm.get("cpus_per_task", 8))}
    if gpus:
        params["gpus_per_node"] = gpus
    if "mem_gb" in slurm:
        params["mem_gb"] = int(slurm["mem_gb"])
    extra = {f"slurm_{k}": slurm[k] for k in ("partition", "account", "qos", "constraint") if k in slurm}
    executor.update_parameters(**params, **(extra if executor.cluster == "slurm" else {}))
    jobs = [executor.submit(_job, grid_path, cell, out, gpus) for cell in cells]
    print(f"[experiment] submitted {len(jobs)} jobs ({executor.cluster}): {', '.join(j.job_id for j in jobs)}",
          flush=True)
    results = []
    for job, cell in zip(jobs, cells):
        try:
            results.append(job.result())
        except Exception as e:  # noqa: BLE001 (a failed job: name it and where its logs are)
            raise RtuneError(f"cell {cell} failed in job {job.job_id} ({type(e).__name__}); logs in "
                             f"{os.fspath(folder).replace('%j', str(job.job_id))}") from e
    return results
