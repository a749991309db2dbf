"""The training recipe: records -> rendered sequences -> (Q)LoRA or full fine-tuning -> a run folder.

One readable loop on top of `accelerate.Accelerator`: `python -m rtune train ...` trains on one
device, `accelerate launch -m rtune train ...` trains data-parallel (DDP) with no code change, or
fully sharded with FSDP2 given an accelerate config with `fsdp_version: 2`
(configs/accelerate/fsdp2.yaml). DeepSpeed is refused (see check_distributed).

The loss of an optimiser step is exactly the mean token cross-entropy over every trained token of
the step: each micro-batch contributes the SUM of its token losses divided by the number of
trained tokens of the whole step (all micro-batches, all processes), known in advance from the
batch plan. Averaging per micro-batch (the "mean of means" bug) would weight a short response's
tokens more than a long one's and make the result depend on how the step is split.

Speed without changing what is trained (rtune.loss, rtune.batching): the output layer runs only on
positions whose next token is trained, in chunks, so the [tokens x vocabulary] logits never exist
at once (loss_impl "chunked", the default); `packing` feeds each micro-batch as one padding-free
row; `group_by_length` makes padded batches nearly padding-free instead; gradient checkpointing
and torch.compile are options. All of them leave the optimiser steps and their loss unchanged up
to float rounding (tests/test_packing.py).

Resuming is exact: the batch order is a pure function of (seed, epoch), the learning rate a pure
function of the step, and a checkpoint holds the trainable weights, optimiser state and every RNG
state, so a resumed run ends with the same weights as an uninterrupted one.

Run folder (it describes itself, so inference always uses the training template):

    rtune_run.json    method, renderer (template), config, base model, data hash and counts,
                      library versions, times, final loss; "status": "complete" is written last
    config.yaml       the resolved config (copy it to repeat the run)
    tokenizer/        the tokenizer (save_pretrained)
    adapter/          LoRA weights (peft save_pretrained), or model/ for full fine-tuning
    log.jsonl         one row per logged step
    checkpoints/step-NNNNNN/   the newest save_total_limit checkpoints
    merged/           with config.merge: base + adapter as a standalone model folder
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rtune.batching import collate_packed, collate_padded, plan_batches, register_varlen_sdpa, trained_tokens
from rtune.checkpoint import (
    atomic_dir,
    begin_checkpoint,
    clean_staging,
    finish_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_tree,
    restore_rng_state,
    staging_dir,
    write_rank_state,
)
from rtune.config import TrainConfig, config_differences, config_from_dict, config_to_yaml, load_config
from rtune.errors import RtuneError
from rtune.io import sha256_file, write_json_atomic, write_text_atomic
from rtune.loss import causal_lm_parts, token_loss_sum  # noqa: F401  (token_loss_sum: part of this module's API)

log = logging.getLogger("rtune.train")

RUN_INFO = "rtune_run.json"
RUN_FORMAT_VERSION = 1
TEMPLATE_INFO = "rtune_template.json"  # written into merged model folders (see merge.py)


# ----------------------------------------------------------------------------------------------
# Small pure pieces (each tested on its own)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls run several times faster than fp32 on such CPUs."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:  # private probes: absent on some builds and platforms
            continue
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware runs it natively (CUDA with bf16, AMX/AVX512-BF16 CPUs), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RtuneError("precision bf16: this GPU has no bf16 support; use --precision fp32")
    return precision


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then constant/cosine/linear decay."""
    warmup = int(math.ceil(config.warmup_ratio * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_scheduler == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.lr_scheduler == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (1.0 - progress)  # linear


def plan_steps(lengths: list[int], config: TrainConfig, epoch: int, world_size: int) -> list[list[list[int]]]:
    """The optimiser steps of one epoch, each a list of micro-batches (lists of sequence indices).

    A step takes world_size x grad_accum consecutive micro-batches of the epoch's plan; the last
    step of an epoch may have fewer. Every process computes the same plan.
    """
    batches = plan_batches(lengths, config.batch_size, config.seed, epoch, config.group_by_length)
    per_step = world_size * config.grad_accum
    return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]


def my_micro_batches(step: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], float]]:
    """This process's share of a step, as (micro-batch, weight) pairs.

    Micro-batches are dealt round-robin. Every process must run the same number of backward passes
    (DDP synchronises gradients on the last one), so a process that is short of micro-batches in an
    epoch's last step repeats the step's first micro-batch with weight 0: it adds nothing to the
    gradient but keeps the processes in step.
    """
    mine = [(b, 1.0) for b in step[rank::world_size]]
    n = math.ceil(len(step) / world_size)
    return mine + [(step[0], 0.0)] * (n - len(mine))


class LossModel(torch.nn.Module):
    """A causal LM together with its summed token loss (rtune.loss), as one module.

    DDP arms its gradient synchronisation in the forward of the module it wraps, and the chunked
    loss calls the model's decoder body rather than the model's own forward; so the whole loss is
    this module's forward, and this module is what accelerate wraps.
    """

    def __init__(self, model, config: TrainConfig, device: torch.device):
        super().__init__()
        self.model = model
        # FSDP wraps each decoder layer on its own: it finds their classes here (accelerate's default).
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
        self.impl, self.chunk = config.loss_impl, config.loss_chunk
        self.device_type, self.bf16 = device.type, config.precision == "bf16"

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # bf16 is our own autocast (fp32 master weights, loss in fp32); see train().
        autocast = torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16)
        return token_loss_sum(self.model, batch, autocast, self.impl, self.chunk)


# ----------------------------------------------------------------------------------------------
# Model, optimiser


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 probes a transformers attribute deprecated in 5.x; the warning is noise for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_peft(model, config: TrainConfig):
    """LoRA / QLoRA adapters on the (already loaded) base model, or full fine-tuning."""
    ckpt_kwargs = {"use_reentrant": False}  # works with a frozen embedding layer, keeps dropout RNG
    if config.peft == "none":
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.peft == "qlora":
        # Casts norms to fp32, freezes the 4-bit base, and turns on gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target,  # "all-linear": every linear layer except the output head
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA A matrices are drawn from the global RNG: seed right here so they depend on the seed only.
    seed_everything(config.seed)
    with quiet_peft():
        return get_peft_model(model, lora)


def check_hardware(config: TrainConfig, device: torch.device) -> None:
    """Fail before anything is written when the config needs what this machine lacks."""
    needs = [what for what, used in (("--peft qlora", config.peft == "qlora"),
                                     ("optimizer paged_adamw_32bit", config.optimizer == "paged_adamw_32bit")) if used]
    if not needs:
        return
    if device.type != "cuda":
        raise RtuneError(f"{' and '.join(needs)} need a CUDA GPU (bitsandbytes); on this machine use "
                         "peft lora and optimizer adamw (e.g. --config cpu)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RtuneError(f"{' and '.join(needs)} need bitsandbytes: pip install 'rtune[gpu]'") from None


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


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig):
    if config.optimizer == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def load_base_model(model_spec: str, config: TrainConfig, device: torch.device):
    from rtune.models import load_model

    if config.peft == "qlora":
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        return load_model(model_spec, dtype=dtype, device=device, quantization="nf4")
    # fp32 master weights; bf16 only inside autocast. Loading straight onto the GPU saves a copy.
    return load_model(model_spec, dtype=torch.float32, device=device if device.type == "cuda" else None)


def choose_attention(model, config: TrainConfig, device: torch.device) -> str:
    """The attention implementation for packed rows (padded batches keep the model's own, sdpa).

    packed_attention "varlen": each sequence of a packed row attends on its own, with
    variable-length flash attention on a GPU with flash-attn installed, else with sdpa run sequence
    by sequence (rtune.batching.varlen_sdpa_attention). "mask": the model's attention with the
    block-diagonal causal mask transformers builds from the restarting position ids (it computes
    attention over the whole row).
    """
    current = model.config._attn_implementation
    if not config.packing or config.packed_attention != "varlen" or current != "sdpa":
        return current
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            model.set_attn_implementation("flash_attention_2")
            return model.config._attn_implementation
        except ImportError:
            log.info("flash-attn is not installed: packed rows use sdpa sequence by sequence")
    model.set_attn_implementation(register_varlen_sdpa())
    return model.config._attn_implementation


class NumpyDropout(torch.nn.Module):
    """nn.Dropout with its mask drawn by numpy's SFC64 generator: for LoRA on CPUs.

    torch's CPU Bernoulli sampling is slow: LoRA's dropout (a mask per adapter, 7 per layer) took
    ~18% of a Gemma 3 270M step on 2 cores; numpy's generator draws the same uniforms ~3x faster.
    Each call seeds a fresh generator from torch's RNG, so runs stay reproducible and resumable
    (checkpoints hold torch's RNG state) and gradient checkpointing replays the same masks. Same
    distribution as nn.Dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed = int(torch.randint(0, 2**62, ()))
        uniform = np.random.Generator(np.random.SFC64(seed)).random(tuple(x.shape), dtype=np.float32)
        keep = torch.from_numpy(uniform >= self.p)
        return x.mul(keep).mul_(1.0 / (1.0 - self.p))


def use_numpy_dropout(model) -> int:
    """Swap the nn.Dropout modules of LoRA adapters for NumpyDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = NumpyDropout(dropout.p)
                    swapped += 1
    return swapped


def decoder_body(model):
    """The decoder body (rtune.loss.causal_lm_parts), or the whole model when it has no such layout."""
    parts = causal_lm_parts(model)
    return parts[0] if parts is not None else model


def frozen_linears_to_bf16(model) -> int:
    """Store the frozen linear layers of the decoder body in bf16 (LoRA under bf16 autocast).

    Autocast casts every linear layer's fp32 weight to bf16 at each forward, and it caches only
    trainable weights, so a frozen base model is re-cast at every micro-batch. Storing the frozen
    weights in bf16 once gives the same numbers (the same rounding, done once), saves those casts
    and half the memory of the base. The embedding and the output layer (tied in Gemma) stay fp32:
    the embedding lookup is not autocast; the loss casts the output layer once (rtune.loss).
    Returns the number of layers converted.
    """
    converted = 0
    for module in decoder_body(model).modules():
        if (isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32
                and not any(p.requires_grad for p in module.parameters())):
            module.to(torch.bfloat16)
            converted += 1
    return converted


def compile_body(model) -> None:
    """torch.compile the decoder body in place (dynamic shapes: micro-batches vary in length)."""
    decoder_body(model).compile(dynamic=True)


def build_model(model_spec: str, config: TrainConfig, device: torch.device, sharded: bool = False):
    """(the model to train, its attention implementation): base model, adapters, speed settings.

    config.precision must be resolved (not "auto"). sharded: FSDP will wrap the model (it keeps
    the base weights in one dtype, so they are not stored in bf16).
    """
    seed_everything(config.seed)
    base = load_base_model(model_spec, config, device)
    attention = choose_attention(base, config, device)
    model = apply_peft(base, config)
    if config.peft == "lora" and config.precision == "bf16" and not sharded:
        frozen_linears_to_bf16(model)
    if config.peft != "none" and device.type == "cpu" and not config.compile:
        use_numpy_dropout(model)  # (compiled code draws its own masks, fused)
    if config.compile:
        compile_body(model)
    return model, attention


def describe_base_model(model_spec: str) -> dict:
    """What the run was trained from, and the spec that loads it again from any working directory."""
    from rtune.models import resolve_model

    ref = resolve_model(model_spec)
    local = ref.kind in ("folder", "gguf")
    path = str(Path(ref.path).resolve()) if local else ref.path
    load = str(Path(path) / ref.gguf_file) if ref.gguf_file else (path if local else ref.spec)
    return {"spec": model_spec, "kind": ref.kind, "path": path, "gguf_file": ref.gguf_file, "load": load}


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Run folder


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_run_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise RtuneError(f"{run_dir} is not an rtune run folder (no {RUN_INFO})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RtuneError(f"{path}: not valid JSON: {e}") from None


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        what = "is a file" if not run_dir.is_dir() else "exists and is not empty"
        raise RtuneError(f"{run_dir} {what}; use --resume to continue that run, or another --out")


def _check_resume(run_dir: Path, saved: dict, expected: dict) -> None:
    """Refuse to resume when anything that shapes the trained weights differs from the saved run."""
    problems = []
    saved_config = config_from_dict(saved["config"], f"{run_dir / RUN_INFO} (config)")
    for name in config_differences(saved_config, expected["config_obj"]):
        problems.append(f"{name} (saved {getattr(saved_config, name)!r}, now {getattr(expected['config_obj'], name)!r})")
    if saved["base_model"]["load"] != expected["base_model"]["load"]:
        problems.append(f"model (saved {saved['base_model']['load']!r}, now {expected['base_model']['load']!r})")
    if saved["data"]["sha256"] != expected["data"]["sha256"]:
        problems.append(f"data (sha256 of {expected['data']['path']} differs from the saved {saved['data']['path']})")
    if saved["renderer"] != expected["renderer"]:
        problems.append("renderer (the template or the tokenizer's special tokens changed)")
    if saved["training"]["world_size"] != expected["training"]["world_size"]:
        problems.append(
            f"number of processes (saved {saved['training']['world_size']}, now {expected['training']['world_size']})"
        )
    if problems:
        raise RtuneError(
            f"cannot resume {run_dir}: these differ from the saved run: " + "; ".join(problems)
            + ". Resume with the same settings, or start a new run with another --out."
        )


def _trim_log(path: Path, last_step: int) -> None:
    """Keep the log rows up to the resumed step (later ones will be logged again); drop a torn last line."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            rows.append(line)
    write_text_atomic(path, "".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# The recipe


def train(
    model_spec: str,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Train `model_spec` on the records in `data_path` and write a run folder at `out_dir`.

    resume=True continues the run in `out_dir` from its newest checkpoint (from step 0 if it has
    none yet) and ends with the same weights as an uninterrupted run. `callback(row)` is called on
    every process after each optimiser step (and after any checkpoint of that step); an exception
    it raises stops training, which tests use to simulate an interruption.
    Returns the final rtune_run.json contents.
    """
    from accelerate import Accelerator

    from rtune.models import library_versions, load_tokenizer
    from rtune.render import Renderer
    from rtune.sources import read_records

    run_dir = Path(out_dir)
    # bf16 is our own autocast around the forward pass (fp32 master weights, loss in fp32), the
    # same thing accelerate's mixed_precision="bf16" does, but decided by the config alone (not by
    # `accelerate launch` flags) and not frozen in accelerate's process-wide state.
    # Processes started by `accelerate launch --multi_gpu` or an FSDP config on a machine without a
    # GPU run on the CPU (gloo): accelerate's own --cpu flag starts a single process.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(mixed_precision="no", cpu=launched > 1 and not torch.cuda.is_available())
    world_size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if launched != world_size:  # otherwise each process would train alone, all into the same folder
        raise RtuneError(f"{launched} processes were launched but accelerate sees {world_size}")
    main = accelerator.is_main_process
    config = load_config(None, config.to_dict())  # re-validate (callers may have edited fields)
    sharded = check_distributed(accelerator, config)
    config.precision = resolve_precision(config.precision, device)
    check_hardware(config, device)
    if config.peft == "none" and config.merge:
        config.merge = False  # full fine-tuning already writes a standalone model/

    # -- the run folder: new, or one to resume --------------------------------------------------
    saved = None
    if resume:
        if not (run_dir / RUN_INFO).is_file():
            has_ckpt = latest_checkpoint(run_dir) is not None
            raise RtuneError(
                f"--resume: {run_dir} has no {RUN_INFO}"
                + ("" if has_ckpt else " and no checkpoint")
                + "; there is no run to resume there (start it without --resume, or delete the folder)"
            )
        saved = read_run_info(run_dir)
    else:
        _check_new_run_dir(run_dir)
    accelerator.wait_for_everyone()  # every process checked before the main one writes anything

    # -- data: records -> rendered sequences ------------------------------------------------------
    tokenizer = load_tokenizer(model_spec)
    renderer = Renderer(tokenizer, template=config.template)
    records = read_records(data_path)
    seqs, stats = renderer.render_dataset(records, config.method, config.max_length)
    counts = stats.as_dict()
    kept = [s for s in seqs if trained_tokens(s.labels) > 0]  # a lone trained token at position 0 predicts nothing
    counts["dropped_nothing_trained"] += len(seqs) - len(kept)
    counts["rendered"] = len(kept)
    seqs = kept
    if counts["dropped_nothing_trained"] and main:
        log.warning(
            "dropped %d of %d records: nothing left to train after truncation to max_length %d",
            counts["dropped_nothing_trained"], len(records), config.max_length,
        )
    if not seqs:
        raise RtuneError(f"{data_path}: no record has a trainable token at max_length {config.max_length}")
    lengths = [len(s.input_ids) for s in seqs]
    n_trained = [trained_tokens(s.labels) for s in seqs]
    counts["trained_tokens"] = sum(n_trained)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    steps_per_epoch = math.ceil(math.ceil(len(seqs) / config.batch_size) / (world_size * config.grad_accum))
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    info = {
        "format": "rtune-run",
        "version": RUN_FORMAT_VERSION,
        "status": "running",
        "method": config.method,
        "renderer": renderer.to_dict(),
        "config": config.to_dict(),
        "base_model": describe_base_model(model_spec),
        "weights": "model" if config.peft == "none" else "adapter",
        "data": {"path": str(Path(data_path).resolve()), "sha256": sha256_file(data_path), **counts},
        "training": {
            "world_size": world_size,
            "device": device.type,
            "precision": config.precision,
            "effective_batch": config.effective_batch(world_size),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
        "versions": library_versions(),
        "start_time": _now(),
        "end_time": None,
        "final_loss": None,
        "resumes": [],
    }
    if saved is not None:
        _check_resume(run_dir, saved, {**info, "config_obj": config})
        if saved.get("status") == "complete":
            if main:
                log.info("%s is already complete; nothing to resume", run_dir)
            return saved
        info["start_time"] = saved.get("start_time", info["start_time"])
        info["resumes"] = saved.get("resumes", [])
        if saved.get("versions") != info["versions"] and main:
            log.warning("library versions differ from the interrupted run's (%s -> %s): the result may differ "
                        "slightly from an uninterrupted run", saved.get("versions"), info["versions"])

    # -- model -------------------------------------------------------------------------------------
    model, info["training"]["attention"] = build_model(model_spec, config, device, sharded)
    info["training"]["distributed"] = accelerator.distributed_type.value.lower() + ("2" if sharded else "")
    params = trainable_parameters(model)
    n_params = sum(p.numel() for p in model.parameters())
    info["training"]["trainable_params"] = sum(p.numel() for p in params.values())
    info["training"]["total_params"] = n_params
    optimizer = make_optimizer(list(params.values()), config)
    # The loss module is what DDP wraps (see LossModel); `unwrapped` is the (peft) model itself.
    loss_model, optimizer = accelerator.prepare(LossModel(model, config, device), optimizer)
    unwrapped = accelerator.unwrap_model(loss_model).model
    params = trainable_parameters(unwrapped)

    # The run folder is written only now: a model that fails to load leaves nothing behind.
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_staging(run_dir)
        write_text_atomic(run_dir / "config.yaml", config_to_yaml(config))
        if not (run_dir / "tokenizer").is_dir():
            with atomic_dir(run_dir / "tokenizer") as tmp:
                tokenizer.save_pretrained(tmp)
        write_json_atomic(run_dir / RUN_INFO, info)  # last: its presence means the header is complete
    accelerator.wait_for_everyone()

    def collate(batch_seqs):
        return collate_packed(batch_seqs) if config.packing else collate_padded(batch_seqs, pad_id)

    # -- resume: weights, optimiser, RNG, position ---------------------------------------------------
    global_step, tokens_seen = 0, 0
    # Dropout masks should differ between processes; process 0 of any run uses the plain seed.
    seed_everything(config.seed + rank)
    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, rank)
        missing = set(params) - set(ckpt["trainable"])
        unexpected = set(ckpt["trainable"]) - set(params)
        if missing or unexpected:
            raise RtuneError(f"{ckpt_path}: parameters do not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        restore_state(loss_model, optimizer, params, ckpt["trainable"], ckpt["optimizer"], sharded)
        restore_rng_state(ckpt["rng"])
        global_step, tokens_seen = ckpt["state"]["step"], ckpt["state"]["tokens_seen"]
        del ckpt
        info["resumes"].append({"from_step": global_step, "time": _now()})
        if main:
            log.info("resuming %s from %s (step %d of %d)", run_dir, ckpt_path.name, global_step, total_steps)
    elif resume:
        info["resumes"].append({"from_step": 0, "time": _now()})
        if main:
            log.info("resuming %s: no checkpoint was written yet, starting from step 0", run_dir)
    if main:
        _trim_log(run_dir / "log.jsonl", global_step)
        log.info(
            "training %s (%s, %s) on %d sequences: %d steps of %d sequences, %s, %s, %d/%d parameters trained",
            model_spec, config.method, config.peft, len(seqs), total_steps, config.effective_batch(world_size),
            device.type, config.precision, info["training"]["trainable_params"], n_params,
        )

    # -- the loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=global_step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    log_file = open(run_dir / "log.jsonl", "a", encoding="utf-8") if main else None
    start_time = time.time()
    window_tokens, window_start = 0, time.time()
    last_loss = None
    loss_model.train()
    try:
        first_epoch = global_step // steps_per_epoch
        for epoch in range(first_epoch, math.ceil(config.epochs)):
            steps = plan_steps(lengths, config, epoch, world_size)
            skip = global_step - epoch * steps_per_epoch  # steps of this epoch already done (resume)
            for step_in_epoch in range(skip, len(steps)):
                if global_step >= total_steps:
                    break
                step = steps[step_in_epoch]
                step_tokens = sum(n_trained[i] for b in step for i in b)  # over all processes
                micro = my_micro_batches(step, rank, world_size)
                # DDP averages gradients over processes; multiplying by world_size undoes that.
                scale = world_size / step_tokens
                local_sum = 0.0
                for j, (indices, weight) in enumerate(micro):
                    batch = {k: v.to(device) for k, v in collate([seqs[i] for i in indices]).items()}
                    last = j == len(micro) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
                        loss_sum = loss_model(batch)
                        accelerator.backward(loss_sum * (weight * scale))
                    local_sum += weight * loss_sum.item()

                max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(list(params.values()), max_norm))
                lr = lr_at(global_step, config, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                tokens_seen += step_tokens
                window_tokens += step_tokens

                step_loss_sum = accelerator.reduce(torch.tensor(local_sum, dtype=torch.float64, device=device), reduction="sum")
                last_loss = float(step_loss_sum) / step_tokens
                row = {
                    "step": global_step,
                    "epoch": round(epoch + (step_in_epoch + 1) / steps_per_epoch, 4),
                    "loss": round(last_loss, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6),
                    "trained_tokens": tokens_seen,
                    "tokens_per_s": None,
                    "elapsed_s": round(time.time() - start_time, 2),
                }
                if global_step % config.log_steps == 0 or global_step == total_steps:
                    now = time.time()
                    row["tokens_per_s"] = round(window_tokens / max(now - window_start, 1e-9), 1)
                    window_tokens, window_start = 0, now
                    if log_file:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)

                if config.save_steps and global_step % config.save_steps == 0 and global_step < total_steps:
                    _save_checkpoint(
                        accelerator, run_dir, global_step, gather_state(loss_model, optimizer, params, sharded), config,
                        {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "tokens_seen": tokens_seen,
                         "loss": last_loss, "world_size": world_size, "time": _now()},
                    )
                if callback is not None:
                    callback(row)
            if global_step >= total_steps:
                break
    finally:
        bar.close()
        if log_file:
            log_file.close()

    # -- final artefacts -----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final_weights = None
    if sharded:  # gather the whole weights (a collective), to save them from the main process
        if config.peft == "none":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            final_weights = {k.removeprefix("model."): v for k, v in full.items()}
        else:
            final_weights, _ = gather_state(loss_model, optimizer, params, sharded, with_optimizer=False)
    if main:
        target = run_dir / info["weights"]
        if target.exists():  # written by an earlier attempt that died before rtune_run.json
            remove_tree(target)
        with atomic_dir(target) as tmp:
            # LoRA: peft writes adapter_config.json + adapter_model.safetensors; full: a model folder.
            # Under FSDP the parameters are shards: save the gathered weights instead.
            unwrapped.save_pretrained(tmp, **({"state_dict": final_weights} if sharded else {}))
        info.update(
            status="complete",
            end_time=_now(),
            final_loss=last_loss,
            steps_done=global_step,
            trained_tokens_seen=tokens_seen,
            train_seconds=round(time.time() - start_time, 1),
        )
        write_json_atomic(run_dir / RUN_INFO, info)  # the completion marker, written last
        log.info("done: %s (final loss %.4f)", run_dir, last_loss if last_loss is not None else float("nan"))
    accelerator.wait_for_everyone()
    if config.merge and main:
        # Free the training copy first: the merge loads the base again (on CPU, one copy at a time).
        del model, loss_model, optimizer, unwrapped, params
        accelerator.free_memory()
        gc.collect()
        from rtune.merge import merge_run

        merge_run(run_dir, run_dir / "merged")
        info["merged"] = "merged"
        write_json_atomic(run_dir / RUN_INFO, info)
    accelerator.wait_for_everyone()
    return info


def _save_checkpoint(accelerator, run_dir: Path, step: int, weights_and_optimizer: tuple, config: TrainConfig,
                     state: dict):
    """Main process stages the folder, every process adds its RNG state, main publishes it.

    weights_and_optimizer: gather_state()'s result (whole tensors, on the main process)."""
    weights, optimizer_state = weights_and_optimizer
    tmp = begin_checkpoint(run_dir, step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    write_rank_state(staging_dir(run_dir, step), accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish_checkpoint(
            run_dir, tmp, step=step, trainable=dict(weights), optimizer_state=optimizer_state, state=state,
            keep=config.save_total_limit,
        )
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Inference side


def load_run(run_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer, renderer, info) of a finished run folder or of a merged model folder.

    The renderer comes from the folder, never from defaults: inference uses the training template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rtune.models import remote_code_allowed
    from rtune.render import Renderer

    run_dir = Path(run_dir)
    if (run_dir / TEMPLATE_INFO).is_file():  # a merged folder (merge.py)
        info = json.loads((run_dir / TEMPLATE_INFO).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(run_dir, trust_remote_code=remote_code_allowed())
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=dtype, trust_remote_code=remote_code_allowed())
    else:
        info = read_run_info(run_dir)
        if info.get("status") != "complete":
            raise RtuneError(f"{run_dir}: training has not finished (status {info.get('status')!r}); "
                             "resume it with --resume")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer", trust_remote_code=remote_code_allowed())
        if info["weights"] == "model":
            model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=dtype, trust_remote_code=remote_code_allowed())
        else:
            from peft import PeftModel

            from rtune.models import load_model

            with quiet_peft():
                model = PeftModel.from_pretrained(load_model(info["base_model"]["load"], dtype=dtype), run_dir / "adapter")
    if device is not None:
        model.to(device)
    model.eval()
    renderer = Renderer.from_dict(info["renderer"], tokenizer)
    return model, tokenizer, renderer, info


# ----------------------------------------------------------------------------------------------
# `python -m rtune.train MODEL DATA OUT [--config cpu] [--set lr=2e-4 ...] [--resume]`
# (the `rtune train` command is the friendly front end; this one is for scripts and tests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtune.train")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--config", default=None, help="preset (paper, paper-qlora, cpu) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bad = [kv for kv in a.set if "=" not in kv]
    if bad:
        p.error(f"--set takes FIELD=VALUE, got {bad[0]!r}")
    try:
        config = load_config(a.config, dict(kv.split("=", 1) for kv in a.set))
        train(a.model, a.data, a.out, config, resume=a.resume, progress=not a.quiet)
    except RtuneError as e:
        print(f"rtune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
