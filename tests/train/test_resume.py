"""Resume: an interrupted run (exception or kill -9) continued with --resume ends bit-identical to an
uninterrupted one; checkpoints are atomic and pruned; resuming with other settings is refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from rtune.errors import RtuneError
from rtune.train.checkpoint import latest_checkpoint, list_checkpoints
from rtune.train.config import load_config
from rtune.train.recipe import train

# LoRA dropout on and length-grouped batches: resuming must restore RNG state and data order.
SETTINGS = dict(
    batch_size=2, grad_accum=2, epochs=2, max_length=64, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1,
    group_by_length=True, precision="fp32", log_steps=1, save_steps=2, save_total_limit=2,
)  # 24 records -> 6 steps per epoch, 12 in all


class Stop(Exception):
    pass


def stop_at(step):
    def callback(row):
        if row["step"] == step:
            raise Stop(step)

    return callback


def write_records(path, n=24):
    words = "the quick brown fox jumps over lazy dog eat well sleep and exercise".split()
    with open(path, "w") as f:
        for i in range(n):
            response = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11)) + "."
            f.write(json.dumps({"id": f"r{i}", "instruction": "say something", "response": response}) + "\n")
    return path


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def reference(tiny_model_path, data, tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(str(tiny_model_path), str(data), str(out), load_config(None, SETTINGS), progress=False)
    return out


@pytest.mark.parametrize("stop", [5, 7])  # mid-epoch (checkpoint 4), and just past an epoch end (checkpoint 6)
def test_interrupted_then_resumed_equals_uninterrupted(tiny_model_path, data, reference, tmp_path, stop):
    out = tmp_path / "run"
    config = load_config(None, SETTINGS)
    with pytest.raises(Stop):
        train(str(tiny_model_path), str(data), str(out), config, progress=False, callback=stop_at(stop))
    saved = latest_checkpoint(out)
    assert saved.name == f"step-{stop - 1:06d}"
    assert json.loads((out / "rtune_run.json").read_text())["status"] == "running"

    info = train(str(tiny_model_path), str(data), str(out), config, resume=True, progress=False)
    assert info["status"] == "complete" and info["steps_done"] == 12
    assert [r["from_step"] for r in info["resumes"]] == [stop - 1]  # it resumed, it did not restart
    assert_same_weights(adapter(out), adapter(reference))
    # the log reads as one run: each step once, same losses as the reference
    rows, ref_rows = log_rows(out), log_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert info["final_loss"] == pytest.approx(json.loads((reference / "rtune_run.json").read_text())["final_loss"])


def test_resume_before_the_first_checkpoint_starts_from_zero(tiny_model_path, data, reference, tmp_path):
    out = tmp_path / "run"
    config = load_config(None, SETTINGS)
    with pytest.raises(Stop):
        train(str(tiny_model_path), str(data), str(out), config, progress=False, callback=stop_at(1))
    assert latest_checkpoint(out) is None
    info = train(str(tiny_model_path), str(data), str(out), config, resume=True, progress=False)
    assert [r["from_step"] for r in info["resumes"]] == [0]
    assert_same_weights(adapter(out), adapter(reference))


def test_kill_9_then_resume_equals_uninterrupted(tiny_model_path, data, reference, tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly mid-checkpoint), then --resume."""
    out = tmp_path / "run"
    script = tmp_path / "slow_train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        from rtune.train.config import load_config
        from rtune.train.recipe import train
        # sleeping after each step slows the run down so the test can kill it part-way; it changes no numbers
        train({str(tiny_model_path)!r}, {str(data)!r}, {str(out)!r}, load_config(None, json.loads(sys.argv[1])),
              progress=False, callback=lambda row: time.sleep(0.25))
    """))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(SETTINGS)], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        time.sleep(0.6)  # let it get a little further (perhaps into the next checkpoint) before killing
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "rtune_run.json").read_text())["status"] == "running"
    resumed_from = int(latest_checkpoint(out).name.split("-")[1])
    assert 2 <= resumed_from < 12

    info = train(str(tiny_model_path), str(data), str(out), load_config(None, SETTINGS), resume=True, progress=False)
    assert info["resumes"][-1]["from_step"] == resumed_from
    assert_same_weights(adapter(out), adapter(reference))
    assert [r["step"] for r in log_rows(out)] == list(range(1, 13))


def test_checkpoints_are_pruned_and_leftovers_ignored(tiny_model_path, data, reference, tmp_path):
    out = tmp_path / "run"
    config = load_config(None, SETTINGS)
    with pytest.raises(Stop):
        train(str(tiny_model_path), str(data), str(out), config, progress=False, callback=stop_at(9))
    assert [p.name for p in list_checkpoints(out)] == ["step-000006", "step-000008"]  # save_total_limit 2
    ckpt = latest_checkpoint(out)
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (8, 1, 2)
    # what a kill during a save leaves behind: a staging folder, and a folder without its marker
    (out / "checkpoints" / ".tmp-step-000010").mkdir()
    (out / "checkpoints" / ".tmp-step-000010" / "trainable.safetensors").write_bytes(b"torn")
    (out / "checkpoints" / "step-000010").mkdir()
    assert latest_checkpoint(out).name == "step-000008"
    info = train(str(tiny_model_path), str(data), str(out), config, resume=True, progress=False)
    assert info["resumes"][-1]["from_step"] == 8
    assert not (out / "checkpoints" / ".tmp-step-000010").exists()
    assert_same_weights(adapter(out), adapter(reference))


def test_resume_refuses_changed_settings_and_missing_runs(tiny_model_path, data, tmp_path):
    out = tmp_path / "run"
    config = load_config(None, SETTINGS)
    with pytest.raises(Stop):
        train(str(tiny_model_path), str(data), str(out), config, progress=False, callback=stop_at(3))

    changed = load_config(None, {**SETTINGS, "lr": 2e-2, "lora_r": 8, "save_steps": 5})
    with pytest.raises(RtuneError) as e:
        train(str(tiny_model_path), str(data), str(out), changed, resume=True, progress=False)
    assert "lr (saved 0.01, now 0.02)" in str(e.value) and "lora_r" in str(e.value)
    assert "save_steps" not in str(e.value)  # bookkeeping may change on resume

    other = write_records(tmp_path / "other.jsonl", n=20)
    with pytest.raises(RtuneError, match="data \\(sha256"):
        train(str(tiny_model_path), str(other), str(out), config, resume=True, progress=False)

    with pytest.raises(RtuneError, match="no rtune_run.json and no checkpoint"):
        train(str(tiny_model_path), str(data), str(tmp_path / "nothing"), config, resume=True, progress=False)
    with pytest.raises(RtuneError, match="use --resume"):
        train(str(tiny_model_path), str(data), str(out), config, progress=False)


def test_resuming_a_complete_run_changes_nothing(tiny_model_path, data, reference):
    before = adapter(reference)
    mtime = os.path.getmtime(reference / "adapter" / "adapter_model.safetensors")
    info = train(str(tiny_model_path), str(data), str(reference), load_config(None, SETTINGS), resume=True, progress=False)
    assert info["status"] == "complete"
    assert os.path.getmtime(reference / "adapter" / "adapter_model.safetensors") == mtime
    assert_same_weights(adapter(reference), before)
