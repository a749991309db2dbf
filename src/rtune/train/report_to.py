"""Dashboards: `rtune train --report-to tensorboard,wandb,mlflow,trackio` gets what log.jsonl gets.

Each backend writes into its own folder of the run folder and needs no network:

    tensorboard  RUN/tensorboard/  event files              tensorboard --logdir RUN/tensorboard
    wandb        RUN/wandb/        an offline run           wandb sync RUN/wandb/offline-run-*
    mlflow       RUN/mlflow/       a local SQLite store     mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db
    trackio      RUN/trackio/      trackio's local store    TRACKIO_DIR=RUN/trackio trackio show

Every number of a log.jsonl row but its step becomes a metric at that step ("loss" -> "train/loss",
"eval_loss" -> "eval/loss"); the resolved config is logged once, when a backend's folder is new
(tensorboard: text and hparams; wandb, trackio: the run config; mlflow: params and config.yaml).
TensorBoard stores scalars as float32.

Resuming from the checkpoint at step k, after an attempt that logged up to step L >= k:
  - a backend whose folder is new (added on resume) first gets log.jsonl's rows up to k;
  - tensorboard drops its events past k (purge_step) and logs again from k + 1, as log.jsonl does;
  - wandb, mlflow and trackio cannot delete points, so they skip steps up to L: they hold them from
    the interrupted attempt, and a resumed run recomputes those steps exactly (only timings differ).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path

from rtune.errors import RtuneError
from rtune.run_folder import LOG_FILE
from rtune.train.config import REPORT_TO, TrainConfig, config_to_yaml

PROJECT = "rtune"  # the wandb/mlflow/trackio project (experiment) name; the run is named after its folder


def names(config: TrainConfig) -> list[str]:
    """The dashboards a config asks for (config.report_to is "none" or names joined by commas)."""
    return [] if config.report_to == "none" else config.report_to.split(",")


def check_installed(config: TrainConfig) -> None:
    """Refuse before training starts when a dashboard's package is missing, naming the extra."""
    for name in names(config):
        if importlib.util.find_spec(BACKENDS[name].package) is None:
            raise _missing(name)


def _missing(name: str) -> RtuneError:
    package = BACKENDS[name].package
    return RtuneError(f"--report-to {name} needs the {package!r} package, which is not installed: "
                      f"pip install 'rtune[{name}]'")


def read_log(run_dir: Path) -> list[dict]:
    """log.jsonl's rows (a torn last line, from a killed run, is skipped)."""
    path = run_dir / LOG_FILE
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def metrics(row: dict) -> dict[str, float]:
    """A log row as metric name -> value: every number but the step."""
    out = {}
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.replace("eval_", "eval/", 1) if key.startswith("eval_") else "train/" + key] = float(value)
    return out


class Dashboards:
    """The backends of one training attempt; `log(row)` is called with each row written to log.jsonl."""

    def __init__(self, run_dir: Path, config: TrainConfig, start_step: int, logged_step: int):
        """start_step: the step this attempt continues from; logged_step: the last step in log.jsonl
        when the attempt began (past start_step after an interruption)."""
        self.backends: list[tuple[Backend, int]] = []  # (backend, last step it must not get again)
        past = [r for r in read_log(run_dir) if r.get("step", 0) <= start_step]
        try:
            for name in names(config):
                folder = run_dir / name
                new = not (folder.is_dir() and any(folder.iterdir()))
                folder.mkdir(parents=True, exist_ok=True)
                backend = BACKENDS[name](folder, config, start_step, new)
                self.backends.append((backend, start_step if new or backend.rewinds else max(start_step, logged_step)))
                if new:  # added on resume: the run's earlier rows first
                    for row in past:
                        backend.log(row["step"], metrics(row))
        except BaseException:
            self.close(ok=False)
            raise

    def log(self, row: dict) -> None:
        values = metrics(row)
        for backend, done in self.backends:
            if row["step"] > done:
                backend.log(row["step"], values)

    def close(self, ok: bool) -> None:
        for backend, _ in self.backends:
            backend.close(ok)
        self.backends = []


class Backend:
    """One dashboard: opened once per training attempt, `log` per log row, `close` at the end."""

    package = ""  # the import name its extra installs
    rewinds = False  # can drop what an interrupted attempt logged past the checkpoint

    def __init__(self, folder: Path, config: TrainConfig, start_step: int, new: bool):
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        raise NotImplementedError


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(name) from None


def _plain(value):
    """A config value as a bool, number or string (what hparams and params take)."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


class TensorBoard(Backend):
    package = "tensorboard"
    rewinds = True

    def __init__(self, folder, config, start_step, new):
        tb = _import("tensorboard", "torch.utils.tensorboard")
        summary = _import("tensorboard", "torch.utils.tensorboard.summary")
        # purge_step writes a session start at start_step + 1: TensorBoard hides what an interrupted
        # attempt wrote from there on. Written on a new run too: TensorBoard's loader takes a run's first
        # session start as its beginning, and purges only at later ones.
        self.writer = tb.SummaryWriter(str(folder), purge_step=start_step + 1)
        if new:
            self.writer.add_text("config", "```yaml\n" + config_to_yaml(config) + "```", 0)
            hparams = {k: _plain(v) for k, v in config.to_dict().items()}
            for s in summary.hparams(hparams, {"train/loss": 0.0}):  # the HParams tab, loss as its metric
                self.writer.file_writer.add_summary(s)

    def log(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, ok):
        self.writer.close()


class WandB(Backend):
    package = "wandb"

    def __init__(self, folder, config, start_step, new):
        wandb = _import("wandb", "wandb")
        id_file = folder / "rtune_run_id"  # one W&B run across resumes: `wandb sync` joins the attempts
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(dir=str(folder.parent), mode="offline", project=PROJECT, name=folder.parent.name,
                              id=run_id, resume="allow", config=config.to_dict(),
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


class MLflow(Backend):
    package = "mlflow"

    def __init__(self, folder, config, start_step, new):
        mlflow = _import("mlflow", "mlflow")
        from mlflow.entities import Param

        self.Metric = mlflow.entities.Metric
        self.client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        id_file = folder / "rtune_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            PROJECT, artifact_location=(folder / "artifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=folder.parent.name).info.run_id
        id_file.write_text(self.run_id)
        self.client.log_batch(self.run_id, params=[Param(k, str(_plain(v))) for k, v in config.to_dict().items()])
        self.client.log_text(self.run_id, config_to_yaml(config), "config.yaml")

    def log(self, step, values):
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def close(self, ok):
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Trackio(Backend):
    package = "trackio"

    def __init__(self, folder, config, start_step, new):
        # trackio reads its storage folder from TRACKIO_DIR once, when first imported.
        if "trackio" not in sys.modules:
            os.environ["TRACKIO_DIR"] = str(folder.resolve())
        trackio = _import("trackio", "trackio")
        where = Path(trackio.utils.TRACKIO_DIR).resolve()
        if where != folder.resolve():
            raise RtuneError(f"--report-to trackio: trackio was imported before, storing in {where}; "
                             f"train in a new process to log into {folder}")
        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints; stdout is rtune train's JSON summary
            self.run = trackio.init(project=PROJECT, name=folder.parent.name, config=config.to_dict(),
                                    resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self, ok):
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # the module's finish also forgets the run (else it finishes again at exit)


BACKENDS: dict[str, type[Backend]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
assert tuple(BACKENDS) == REPORT_TO
