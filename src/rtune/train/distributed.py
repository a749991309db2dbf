"""Distributed training: which accelerate setups rtune trains under, and whole-weight state under FSDP2.

Tested: one device, DDP and FSDP2 (tests/train/test_distributed.py runs 2 CPU processes of each
against one process). Under FSDP2 every process holds a shard of the weights; checkpoints and the
final weights are gathered into whole tensors, so a run trained with FSDP2 loads, merges and
resumes like any other.
"""

from __future__ import annotations

import torch

from rtune.errors import RtuneError
from rtune.train.config import TrainConfig


def check_distributed(accelerator, config: TrainConfig) -> bool:
    """Refuse the distributed setups whose loss or checkpoints are not verified; True for FSDP2.

    Tested: one device, DDP, FSDP2 (tests/test_distributed.py runs 2 CPU processes of each against one
    process). FSDP1 clips gradients correctly only when every parameter is trained (not LoRA) and
    keeps flat parameters our checkpoints do not read; DeepSpeed owns gradient accumulation, loss
    scaling and clipping itself, which would bypass rtune's exact token-mean loss over the step.
    """
    from accelerate import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return False
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise RtuneError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config "
                             "(configs/accelerate/fsdp2.yaml is a ready one)")
        if config.peft == "qlora":
            raise RtuneError("--peft qlora with FSDP is not supported (untested); use DDP for QLoRA")
        return True
    if kind == DistributedType.DEEPSPEED:
        raise RtuneError("DeepSpeed is not supported: it takes over gradient accumulation, loss scaling and "
                         "clipping, which would change rtune's loss (the mean over every trained token of the "
                         "step); shard with FSDP2 instead (configs/accelerate/fsdp2.yaml)")
    raise RtuneError(f"accelerate distributed type {kind.value} is not supported; use DDP or FSDP2")


def gather_state(loss_model, optimizer, params: dict, sharded: bool, with_optimizer: bool = True):
    """(trainable weights, optimiser state), whole and on the CPU, named as in `params`.

    Unsharded runs hold them already. Under FSDP every process holds a shard: this is then a
    collective (every process must call it) and only the main process receives the result.
    """
    if not sharded:
        return params, (optimizer.state_dict() if with_optimizer else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(loss_model, options=options)
    weights = {k.removeprefix("model."): v for k, v in weights.items() if k.removeprefix("model.") in params}
    state = get_optimizer_state_dict(loss_model, optimizer.optimizer, options=options) if with_optimizer else None
    return weights, state


def restore_state(loss_model, optimizer, params: dict, weights: dict, optimizer_state: dict, sharded: bool) -> None:
    """Load a checkpoint's whole trainable weights and optimiser state into the (possibly sharded) model."""
    if not sharded:
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)  # frozen weights are not in a checkpoint
    set_model_state_dict(loss_model, {f"model.{k}": v for k, v in weights.items()}, options=options)
    set_optimizer_state_dict(loss_model, optimizer.optimizer, optimizer_state, options=options)
