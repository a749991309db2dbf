"""The model to train: base model, adapters (LoRA, QLoRA) or full fine-tuning, speed settings, optimiser.

`build_model` loads the base, chooses the attention implementation, adds adapters and applies the
speed settings that leave the trained function unchanged (frozen base linears stored in bf16
under bf16 autocast, LoRA dropout masks drawn by numpy on CPUs, optional torch.compile).
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch

from rtune.errors import RtuneError
from rtune.models import load_model, quiet_peft
from rtune.models.heads import causal_lm_parts
from rtune.train.batching import register_varlen_sdpa
from rtune.train.config import TrainConfig

log = logging.getLogger("rtune.train")


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


def check_hardware(config: TrainConfig, device: torch.device) -> None:
    """Fail before anything is written when the config needs what this machine lacks."""
    if config.loss_impl == "liger":
        if device.type != "cuda":
            raise RtuneError("loss_impl liger (Liger Kernel, Triton) needs a CUDA GPU; use loss_impl chunked here")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise RtuneError("loss_impl liger needs Liger Kernel: pip install liger-kernel") from None
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


def load_base_model(model_spec: str, config: TrainConfig, device: torch.device):
    if config.peft == "qlora":
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        return load_model(model_spec, dtype=dtype, device=device, quantization="nf4")
    # fp32 master weights; bf16 only inside autocast. Loading straight onto the GPU saves a copy.
    return load_model(model_spec, dtype=torch.float32, device=device if device.type == "cuda" else None)


def choose_attention(model, config: TrainConfig, device: torch.device) -> str:
    """The attention implementation for packed rows (padded batches keep the model's own, sdpa).

    packed_attention "varlen": each sequence of a packed row attends on its own, with
    variable-length flash attention on a GPU with flash-attn installed, else with sdpa run sequence
    by sequence (rtune.train.batching.varlen_sdpa_attention). "mask": the model's attention with the
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


def checkpoint_layers(model) -> list:
    """The decoder layers that can recompute their activations in backward (transformers' own)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def layers_to_checkpoint(tokens: int, budget: int, n_layers: int) -> int:
    """How many of n_layers recompute their activations so that the others keep about `budget`
    tokens' worth: none up to the budget, then the share beyond it (activations grow with tokens)."""
    if tokens <= budget:
        return 0
    return min(n_layers, math.ceil(n_layers * (1 - budget / tokens)))


def enable_checkpointing(model, config: TrainConfig) -> None:
    """Gradient checkpointing on every layer, or (checkpoint_tokens) ready but off: LossModel turns it
    on per micro-batch. Non-reentrant: works with a frozen embedding layer and replays the same dropout
    masks (the RNG state is restored for the recompute), so the gradients are the same bit for bit."""
    if not (config.gradient_checkpointing or config.checkpoint_tokens):
        return
    if config.peft != "qlora":  # prepare_model_for_kbit_training turns it on for QLoRA (apply_peft)
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # older ones in rtune's range (5.20.2 has only the old name)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not config.gradient_checkpointing:
        for layer in checkpoint_layers(model):
            layer.gradient_checkpointing = False
        # Only reentrant checkpointing needs inputs that require grad; without it no gradient flows
        # into the first layer's input, as when checkpointing is off.
        model.disable_input_require_grads()


def apply_peft(model, config: TrainConfig):
    """LoRA / QLoRA adapters on the (already loaded) base model, or full fine-tuning."""
    if config.peft == "none":
        enable_checkpointing(model, config)
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.peft == "qlora":
        # Casts norms to fp32, freezes the 4-bit base, and turns on gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(config.gradient_checkpointing or config.checkpoint_tokens),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    enable_checkpointing(model, config)
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
    """The decoder body (rtune.models.heads.causal_lm_parts), or the whole model when it has no such layout."""
    parts = causal_lm_parts(model)
    return parts[0] if parts is not None else model


def frozen_linears_to_bf16(model) -> int:
    """Store the frozen linear layers of the decoder body in bf16 (LoRA under bf16 autocast).

    Autocast casts every linear layer's fp32 weight to bf16 at each forward, and it caches only
    trainable weights, so a frozen base model is re-cast at every micro-batch. Storing the frozen
    weights in bf16 once gives the same numbers (the same rounding, done once), saves those casts
    and half the memory of the base. The embedding and the output layer (tied in Gemma) stay fp32:
    the embedding lookup is not autocast; the loss casts the output layer once (rtune.train.loss).
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


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, fused: bool = False):
    """The optimiser. fused: torch's fused AdamW (one kernel per step instead of ~10 per parameter: on
    a GPU a LoRA model's hundreds of small tensors otherwise cost thousands of launches per step);
    the CPU keeps the per-parameter loop, whose numbers earlier runs were trained with."""
    if config.optimizer == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=config.lr, weight_decay=config.weight_decay)
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **extra)


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
