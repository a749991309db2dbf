"""Multi-process training on 2 CPU processes (gloo):

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m rtune train ...  (DDP)
    python -m torch.distributed.run --nproc_per_node 2 tests/train/fsdp2_on_cpu.py train ...              (FSDP2)

(accelerate enables FSDP only on GPUs; tests/train/fsdp2_on_cpu.py sets its FSDP2 plugin on CPUs.) With
1 x 2 accumulation per process they must train exactly what 1 process with 1 x 4 trains: the loss is
the mean over the step's trained tokens across processes, also in the short last step (23
records). FSDP2 also checkpoints whole weights and resumes from them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import DistributedType
from safetensors.torch import load_file
from tiny import write_records

from rtune.errors import RtuneError
from rtune.run_folder import read_run_info
from rtune.train.config import load_config
from rtune.train.distributed import check_distributed
from rtune.train.recipe import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
SETTINGS = dict(batch_size=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=1, lr=1e-3, max_length=64,
                precision="fp32", log_steps=1, save_steps=0)


def launch(kind: str, args: list[str], timeout: int = 240) -> None:
    if kind == "ddp":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
               "--num_processes", "2", "-m", "rtune"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("fsdp2_on_cpu.py"))]
    cmd += ["train", "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a hang can be cleaned up
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    info = read_run_info(run_dir)
    folder = run_dir / info["weights"]
    name = "adapter_model.safetensors" if info["weights"] == "adapter" else "model.safetensors"
    return load_file(str(folder / name))


def assert_same_training(multi: Path, one: Path, steps: int) -> None:
    a, b = log_rows(multi), log_rows(one)
    assert len(a) == len(b) == steps
    for ra, rb in zip(a, b):
        assert ra["trained_tokens"] == rb["trained_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa, wb = weights(multi), weights(one)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,peft", [("ddp", "lora"), ("fsdp2", "lora"), ("fsdp2", "none")])
def test_two_processes_equal_one(tiny_model_path, tmp_path, kind, peft):
    data = write_records(tmp_path / "d.jsonl", n=23)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**SETTINGS, "grad_accum": 2, "peft": peft}))
    launch(kind, ["--model", str(tiny_model_path), "--data", str(data), "--method", "rt",
                               "--config", str(config_file), "--out", str(tmp_path / "multi")])
    train(str(tiny_model_path), str(data), str(tmp_path / "one"),
          load_config(None, {**SETTINGS, "grad_accum": 4, "peft": peft}), progress=False)
    assert_same_training(tmp_path / "multi", tmp_path / "one", steps=6)  # ceil(23 / 4)
    info = read_run_info(tmp_path / "multi")
    assert info["training"]["world_size"] == 2 and info["training"]["effective_batch"] == 4
    assert info["training"]["distributed"] == ("fsdp2" if kind == "fsdp2" else "multi_cpu")


def test_fsdp2_checkpoints_whole_weights_and_resumes_to_the_same_result(tiny_model_path, tmp_path):
    data = write_records(tmp_path / "d.jsonl", n=23)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**SETTINGS, "grad_accum": 2, "save_steps": 3}))
    args = ["--model", str(tiny_model_path), "--data", str(data), "--config", str(config_file)]
    launch("fsdp2", [*args, "--out", str(tmp_path / "full")])

    # The step-3 checkpoint holds whole (gathered) tensors, as a 1-process run's checkpoint does.
    train(str(tiny_model_path), str(data), str(tmp_path / "one"),
          load_config(None, {**SETTINGS, "grad_accum": 4, "save_steps": 3}), progress=False)
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "step-000003" / "trainable.safetensors"))
    ref = load_file(str(tmp_path / "one" / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert ckpt.keys() == ref.keys()
    for k in ckpt:
        assert ckpt[k].shape == ref[k].shape
        torch.testing.assert_close(ckpt[k], ref[k], rtol=1e-4, atol=1e-6)

    # An interruption after the checkpoint: the final weights and run info are gone, status "running".
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "adapter")
    info = json.loads((cut / "rtune_run.json").read_text())
    (cut / "rtune_run.json").write_text(json.dumps({**info, "status": "running"}))
    launch("fsdp2", [*args, "--out", str(cut), "--resume"])
    resumed = read_run_info(cut)
    assert resumed["status"] == "complete" and resumed["resumes"][-1]["from_step"] == 3
    assert [r["loss"] for r in log_rows(cut)] == [r["loss"] for r in log_rows(tmp_path / "full")]
    wa, wb = weights(cut), weights(tmp_path / "full")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,fsdp2,peft,message", [
    (DistributedType.DEEPSPEED, False, "lora", "DeepSpeed is not supported"),
    (DistributedType.FSDP, False, "lora", "fsdp_version: 2"),
    (DistributedType.FSDP, True, "qlora", "qlora with FSDP"),
])
def test_unverified_distributed_setups_are_refused(kind, fsdp2, peft, message):
    accelerator = SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2)
    with pytest.raises(RtuneError, match=message):
        check_distributed(accelerator, load_config(None, {"peft": peft}))
    assert check_distributed(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True),
                             load_config(None, {})) is True


def test_shipped_accelerate_configs_select_ddp_and_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.mixed_precision == "no"  # rtune's own bf16 autocast
