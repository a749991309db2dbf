"""Crash-safe checkpoints and folders.

A checkpoint is a folder `<run>/checkpoints/step-NNNNNN/` holding everything a resumed run needs
to continue bit-for-bit where the saved one stood:

    trainable.safetensors   the trainable parameters (LoRA weights, or every weight for full FT)
    optimizer.pt            optimiser state (AdamW moments and step counts)
    rng-rank{R}.pt          RNG states of torch (CPU and CUDA), python and numpy, one file per process
    state.json              step, epoch, position within the epoch, tokens seen; written last

The folder is assembled under a hidden temporary name and renamed into place once every file is
fsync'ed, so a `kill -9` at any moment leaves either the previous complete checkpoint or the new
complete one, never a half-written one. Old checkpoints are moved aside (atomic rename) before
they are deleted, for the same reason.

The learning-rate schedule has no state of its own: it is a pure function of the step (rtune.train.recipe.lr_at).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rtune.io import fsync_dir, fsync_tree, remove_tree

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    """RNG states as plain tensors and lists, so torch.load(weights_only=True) reads them back."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint `step` is assembled. The same name on every process of a distributed run."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Create an empty staging folder (main process only; the others wait, then write their RNG file)."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():  # left by a run killed while saving
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int) -> None:
    """Each process saves its own RNG state (dropout masks differ between processes)."""
    torch.save(capture_rng_state(), tmp / f"rng-rank{rank}.pt")


def finish_checkpoint(
    run_dir: str | os.PathLike,
    tmp: Path,
    *,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write the shared files, publish the folder atomically, delete the oldest beyond `keep` (main process)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    if final.exists():  # the same step saved again (cannot normally happen); replace it
        remove_tree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_tree(old)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. Staging and trash folders (hidden names) are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len("step-") :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_staging(run_dir: str | os.PathLike) -> None:
    """Remove staging/trash folders a killed run left behind (main process, before training starts)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> dict:
    """Read a checkpoint: {"trainable", "optimizer", "rng", "state"} (rng is this process's)."""
    path = Path(path)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{path} has no RNG state for process {rank} (saved with fewer processes?)")
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True),
        "state": json.loads((path / STATE_FILE).read_text(encoding="utf-8")),
    }
