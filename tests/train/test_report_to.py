"""--report-to: dashboards get exactly what log.jsonl gets, also across --resume, and logging choices
are bookkeeping (a resumed run may change them)."""

import glob
import json
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from tiny import write_records

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.train import report_to
from rtune.train.config import BOOKKEEPING_FIELDS, REPORT_TO, TrainConfig, config_differences, load_config
from rtune.train.recipe import train

# 24 records -> 6 steps per epoch, 12 in all; a checkpoint every 2 steps, every step logged.
SETTINGS = dict(batch_size=2, grad_accum=2, epochs=2, max_length=64, lr=1e-2, lora_r=4, lora_alpha=8,
                precision="fp32", log_steps=1, save_steps=2)


class Stop(Exception):
    pass


def stop_at(step):
    def callback(row):
        if row["step"] == step:
            raise Stop(step)

    return callback


class Recorder(report_to.Backend):
    """Stands in for a dashboard that cannot delete points (wandb, mlflow, trackio): records what it gets."""

    package = "json"  # installed everywhere
    opened = []  # one list of (step, values) per attempt

    def __init__(self, folder, config, start_step, new):
        (folder / "opened").write_text("yes")  # the folder is no longer new
        self.got = []
        Recorder.opened.append(self.got)

    def log(self, step, values):
        self.got.append((step, values))

    def close(self, ok):
        pass


@pytest.fixture
def recorder(monkeypatch):
    """--report-to wandb records instead (the real one is not installed in CI)."""
    monkeypatch.setitem(report_to.BACKENDS, "wandb", Recorder)
    Recorder.opened = []
    return Recorder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl")


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir, plugin=False):
    """{tag: [(step, value)]} as TensorBoard shows them (plugin=True: the loader TensorBoard's server uses)."""
    if plugin:
        acc = plugin_event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
        acc.Reload()
        tags = acc.PluginTagToContent("scalars")
        return {t: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(t)] for t in tags}
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def assert_tensorboard_equals_log(run_dir):
    rows = log_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for plugin in (False, True):
        scalars = tensorboard_scalars(run_dir, plugin)
        assert set(scalars) == {"train/" + k for k in rows[0] if k != "step"}
        for key in rows[0]:
            if key != "step":  # TensorBoard keeps float32
                assert scalars["train/" + key] == [(r["step"], float(np.float32(r[key]))) for r in rows], key


def assert_recorded_once(got, rows):
    """A dashboard that cannot rewind got each step once, with log.jsonl's values for the recomputed ones."""
    assert [step for step, _ in got] == [r["step"] for r in rows]
    for (step, values), row in zip(got, rows):
        assert values["train/loss"] == row["loss"] and values["train/lr"] == row["lr"], step
        assert values["train/grad_norm"] == row["grad_norm"], step


def test_tensorboard_equals_log_across_a_resume(tiny_model_path, data, tmp_path, recorder):
    out = tmp_path / "run"
    config = load_config(None, {**SETTINGS, "report_to": "tensorboard,wandb"})
    with pytest.raises(Stop):  # step 5 is logged everywhere, the checkpoint is step 4
        train(str(tiny_model_path), str(data), str(out), config, progress=False, callback=stop_at(5))
    info = train(str(tiny_model_path), str(data), str(out), config, resume=True, progress=False)
    assert info["status"] == "complete" and [r["from_step"] for r in info["resumes"]] == [4]

    # The event files hold step 5 twice; TensorBoard shows it once, from the resumed attempt.
    files = sorted(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*")))
    steps = [e.step for f in files for e in EventFileLoader(f).Load()
             if e.HasField("summary") and any(v.tag == "train/loss" for v in e.summary.value)]
    assert steps == [1, 2, 3, 4, 5] + list(range(5, 13))
    assert_tensorboard_equals_log(out)

    # The config, as text (config.yaml) and as hparams, once.
    acc = plugin_event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("config/text_summary")
    assert len(texts) == 1
    assert tensor_util.make_ndarray(texts[0].tensor_proto).item().decode() == (
        "```yaml\n" + (out / "config.yaml").read_text() + "```")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == 1e-2 and start.hparams["method"].string_value == "rt"
    assert start.hparams["max_steps"].string_value == "none"

    # Steps 1-5 from the first attempt, 6-12 from the second: step 5 was not sent again.
    first, second = recorder.opened
    assert [s for s, _ in first] == [1, 2, 3, 4, 5] and [s for s, _ in second] == list(range(6, 13))
    assert_recorded_once(first + second, log_rows(out))


def test_dashboards_added_on_resume_get_the_whole_run(tiny_model_path, data, tmp_path, recorder):
    """Logging choices are bookkeeping: resume with --report-to added; the new dashboards get steps 1-4
    from log.jsonl, then the resumed steps."""
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(str(tiny_model_path), str(data), str(out), load_config(None, SETTINGS), progress=False,
              callback=stop_at(5))
    config = load_config(None, {**SETTINGS, "report_to": "wandb,tensorboard", "log_steps": 2})
    info = train(str(tiny_model_path), str(data), str(out), config, resume=True, progress=False)
    assert [r["from_step"] for r in info["resumes"]] == [4]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6, 8, 10, 12]  # every step, then every other one
    (got,) = recorder.opened
    assert_recorded_once(got, rows)
    scalars = tensorboard_scalars(out)
    assert scalars["train/loss"] == [(r["step"], float(np.float32(r["loss"]))) for r in rows]


def test_report_to_is_bookkeeping():
    assert set(BOOKKEEPING_FIELDS) <= {f for f in TrainConfig.__dataclass_fields__}
    assert {"report_to", "log_steps", "save_steps", "save_total_limit", "merge"} <= set(BOOKKEEPING_FIELDS)
    a, b = TrainConfig(), load_config(None, {"report_to": "tensorboard", "log_steps": 1, "lr": 3e-4})
    assert config_differences(a, b) == ["lr"]


@pytest.mark.parametrize("value, expected", [
    ("none", "none"), ("", "none"), ("TensorBoard, wandb,tensorboard", "tensorboard,wandb"),
    (["mlflow", "trackio"], "mlflow,trackio"), ("none,wandb", "wandb"),
])
def test_report_to_values(value, expected):
    assert load_config(None, {"report_to": value}).report_to == expected


def test_unknown_dashboard_lists_the_known_ones(capsys):
    with pytest.raises(RtuneError) as e:
        load_config(None, {"report_to": "tensorboard,tensorbord"})
    assert "'tensorbord'" in str(e.value) and all(name in str(e.value) for name in REPORT_TO)
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--report-to", "comet"]) == 2
    err = capsys.readouterr().err
    assert "field 'report_to'" in err and "'comet'" in err and all(name in err for name in REPORT_TO)


@pytest.mark.parametrize("name", REPORT_TO)
def test_missing_package_names_the_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, report_to.BACKENDS[name].package, None)  # as if not installed
    with pytest.raises(RtuneError) as e:
        report_to.check_installed(load_config(None, {"report_to": name}))
    assert f"pip install 'rtune[{name}]'" in str(e.value)
    with pytest.raises(RtuneError, match=rf"rtune\[{name}\]"):  # the backend's own import says the same
        report_to._import(name, report_to.BACKENDS[name].package)


def test_missing_package_stops_before_anything_is_written(monkeypatch, tiny_model_path, data, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(RtuneError, match=r"rtune\[mlflow\]"):
        train(str(tiny_model_path), str(data), str(tmp_path / "run"),
              load_config(None, {**SETTINGS, "report_to": "tensorboard,mlflow"}), progress=False)
    assert not (tmp_path / "run").exists()


def test_metrics_of_a_row():
    row = {"step": 3, "epoch": 0.5, "loss": 1.25, "lr": 1e-4, "tokens_per_s": None, "eval_loss": 2.0, "note": "x"}
    assert report_to.metrics(row) == {"train/epoch": 0.5, "train/loss": 1.25, "train/lr": 1e-4, "eval/loss": 2.0}
