"""Training configuration: one dataclass with every knob, two presets, YAML files that mirror them.

`TrainConfig()` holds the paper's hyperparameters (An, Kim & Kim 2024): LoRA r=64, alpha=16,
dropout 0.1 on all linear layers, lr 1e-4 constant, 10 epochs, 8 x 8 accumulation (effective
batch 64), max length 2048, max_grad_norm 0.3, seed 0, bf16 where the hardware has it, with
portable choices for the parts that need a GPU (plain LoRA on a full-precision base, torch AdamW).
The presets:

    paper        the defaults above (runs anywhere; slow on a CPU).
    paper-qlora  the paper exactly: QLoRA (4-bit NF4 base), paged AdamW 32-bit, gradient
                 checkpointing, bf16. Needs CUDA and bitsandbytes.
    cpu          a laptop setting: LoRA, micro-batch 2 x 4 accumulation (effective 8), max length
                 512, 3 epochs, length-grouped batches, bf16 autocast where the CPU has native bf16.

`configs/paper.yaml` and `configs/cpu.yaml` are the same presets written out for users to copy.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rtune.errors import RtuneError
from rtune.render import ICL_TEMPLATES, METHODS, TEMPLATES

PEFT = ("lora", "qlora", "none")
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "paged_adamw_32bit")
LOSS_IMPLS = ("chunked", "full", "liger")
PACKED_ATTENTION = ("varlen", "mask")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")  # dashboards (rtune.train.report_to)


def _field(default, help: str):
    """A config field with its help text: `rtune train --help` shows it (flags are derived from the fields)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # What is trained
    method: str = _field("rt", "rt (responses only) | it (instruction + response) | rt-empty-user")
    template: str = _field("tulu", "tulu (the paper's plain-text tags) | model (the tokenizer's chat template)")
    peft: str = _field("lora", "lora | qlora (4-bit NF4 base, CUDA only) | none (full fine-tuning)")
    lora_r: int = _field(64, "LoRA rank")
    lora_alpha: int | float = _field(16, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _field(0.1, "dropout on the LoRA input")
    lora_target: str | list[str] = _field("all-linear", "all-linear (every linear layer but the output head) or module names, e.g. q_proj,v_proj")

    # Optimisation
    optimizer: str = _field("adamw", "adamw | paged_adamw_32bit (bitsandbytes, CUDA)")
    lr: float = _field(1e-4, "learning rate")
    lr_scheduler: str = _field("constant", "constant | cosine | linear")
    warmup_ratio: float = _field(0.0, "fraction of all optimiser steps spent warming up linearly from 0")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    max_grad_norm: float = _field(0.3, "gradient clipping norm; 0 = no clipping")
    epochs: int | float = _field(10, "training epochs; may be fractional (0.5 = half an epoch)")
    max_steps: int | None = _field(None, "stop after this many optimiser steps (the schedule ends there too)")
    batch_size: int = _field(8, "sequences per micro-batch per process")
    grad_accum: int = _field(8, "micro-batches per optimiser step per process")
    max_length: int = _field(2048, "tokens; longer sequences are truncated (the renderer drops those left untrained)")
    group_by_length: bool = _field(False, "batch sequences of similar length (less padding, same randomness per epoch)")
    seed: int = _field(0, "random seed (batch order, LoRA initialisation, dropout)")

    # Hardware
    precision: str = _field("auto", "auto: bf16 where the hardware has it natively (CUDA bf16, AMX/AVX512-BF16 CPUs), else fp32")
    gradient_checkpointing: bool = _field(False, "recompute activations in backward: less memory, a little slower")
    checkpoint_tokens: int = _field(0, "gradient checkpointing chosen per micro-batch: layers keep their activations "
                                       "for about this many tokens (rows x padded length), the others recompute "
                                       "theirs in backward; 0 = off (then gradient_checkpointing decides)")

    # Speed (none of these changes what is trained: same tokens, same loss up to float rounding)
    packing: bool = _field(False, "each micro-batch as one padding-free row, sequences kept apart by their position ids")
    fuse_steps: bool = _field(False, "with packing: the micro-batches of an optimiser step as one packed row (the same "
                                     "steps as batch_size x grad_accum, fewer and larger matmuls, the memory of a step)")
    packed_attention: str = _field("varlen", "varlen: sequence by sequence (flash-attn on GPU) | mask: block-diagonal mask")
    loss_impl: str = _field("chunked", "chunked: output layer on trained positions only, in chunks | full: all logits"
                                        " | liger: Liger Kernel's fused linear cross-entropy on trained positions "
                                        "(CUDA, pip install liger-kernel)")
    loss_chunk: int = _field(0, "positions per output-layer chunk (chunked loss); 0 = auto (~256 MiB of fp32 logits)")
    compile: bool = _field(False, "torch.compile the decoder body")

    # Bookkeeping
    log_steps: int = _field(10, "log every N optimiser steps")
    save_steps: int = _field(200, "checkpoint every N optimiser steps; 0 = no checkpoints (final weights only)")
    save_total_limit: int = _field(2, "checkpoints kept (oldest deleted first)")
    merge: bool = _field(False, "also write merged standalone weights (LoRA only) to <run>/merged at the end")
    report_to: str = _field("none", "dashboards fed what log.jsonl logs, plus the config, written offline into the "
                                    "run folder: none, or a comma-separated subset of " + ", ".join(REPORT_TO))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size


PRESETS: dict[str, dict] = {
    "paper": {},
    "paper-qlora": {
        "peft": "qlora",
        "optimizer": "paged_adamw_32bit",
        "gradient_checkpointing": True,
        "precision": "bf16",
    },
    # A laptop: 200-250 trained tokens/s for Gemma 3 270M with LoRA on 2 AMX cores (bf16 autocast,
    # chunked loss; perf/train_throughput.py). Effective batch 8 gives ~125 optimiser steps
    # per epoch on LIMA instead of 16. CPU throughput hardly depends on the micro-batch, so 2 x 4
    # accumulation (exactly the loss of one batch of 8, see rtune.train.recipe) keeps peak memory near 5 GB.
    # Length-grouped padded batches ran as fast as packing here and use less memory.
    "cpu": {
        "peft": "lora",
        "optimizer": "adamw",
        "batch_size": 2,
        "grad_accum": 4,
        "max_length": 512,
        "epochs": 3,
        "group_by_length": True,
        "precision": "auto",
        "gradient_checkpointing": False,
        # Micro-batches over 1,536 tokens recompute some layers: 8 x 512 tokens (12 of Gemma 3 270M's 18
        # layers recompute) peak at ~5.3 GB instead of ~8, while this preset's micro-batches of 2 x <= 512
        # tokens recompute nothing (no loss of speed).
        "checkpoint_tokens": 1536,
        "log_steps": 1,
        "save_steps": 25,
    },
}

# Fields that only change bookkeeping (logs, checkpoints, dashboards, extra copies) or memory (which
# layers recompute activations: the same values, bit for bit), never the trained weights: a resumed run
# may change them (config_differences ignores them), and an experiment grid must leave them out of its
# cell keys.
BOOKKEEPING_FIELDS = ("log_steps", "save_steps", "save_total_limit", "merge", "report_to", "checkpoint_tokens")


def _choice(choices: tuple):
    def check(v):
        if v not in choices:
            return f"must be one of {', '.join(choices)}, got {v!r}"
        return None

    return check


# Fields with a fixed set of values (shown as the metavar of their flag).
CHOICES = {
    "method": METHODS,
    "template": TEMPLATES,
    "peft": PEFT,
    "lr_scheduler": SCHEDULERS,
    "precision": PRECISIONS,
    "optimizer": OPTIMIZERS,
    "loss_impl": LOSS_IMPLS,
    "packed_attention": PACKED_ATTENTION,
}

# Checks per field: return an error text or None.
_CHECKS = {
    **{name: _choice(choices) for name, choices in CHOICES.items()},
    "loss_chunk": lambda v: None if v >= 0 else "must be >= 0 (0 = auto)",
    "checkpoint_tokens": lambda v: None if v >= 0 else "must be >= 0 (0 = off)",
    "lora_r": lambda v: None if v >= 1 else "must be >= 1",
    "lora_alpha": lambda v: None if v > 0 else "must be > 0",
    "lora_dropout": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "lr": lambda v: None if v > 0 else "must be > 0",
    "warmup_ratio": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "weight_decay": lambda v: None if v >= 0 else "must be >= 0",
    "max_grad_norm": lambda v: None if v >= 0 else "must be >= 0 (0 = no clipping)",
    "epochs": lambda v: None if v > 0 else "must be > 0",
    "max_steps": lambda v: None if v is None or v >= 1 else "must be >= 1 or null",
    "batch_size": lambda v: None if v >= 1 else "must be >= 1",
    "grad_accum": lambda v: None if v >= 1 else "must be >= 1",
    "max_length": lambda v: None if v >= 2 else "must be >= 2",
    "log_steps": lambda v: None if v >= 1 else "must be >= 1",
    "save_steps": lambda v: None if v >= 0 else "must be >= 0 (0 = no checkpoints)",
    "save_total_limit": lambda v: None if v >= 1 else "must be >= 1",
}


def _check_template(v):
    if v in ICL_TEMPLATES:  # a clear refusal, not just "must be one of"
        return (f"{v!r} is an in-context prompt for untrained base models (inference only: --icl {v} on rtune "
                "generate, chat, serve and eval); training renders with tulu or model")
    return _choice(TEMPLATES)(v)


_CHECKS["template"] = _check_template


@dataclass(frozen=True)
class FieldInfo:
    """A config field as the command line shows it."""

    name: str
    type_text: str  # "bool", "int", "float", "int | None", ...
    default: object
    help: str

    @property
    def metavar(self) -> str:
        if self.name in CHOICES:
            return "|".join(CHOICES[self.name])
        if self.name == "lora_target":
            return "MODULES"
        if self.name == "report_to":
            return "none|" + ",".join(REPORT_TO)
        if "float" in self.type_text:
            return "X"
        return "N" if self.type_text.startswith("int") else "VALUE"


def config_fields() -> list[FieldInfo]:
    """Every TrainConfig field with its type, default and help (the source of `rtune train`'s flags)."""
    return [FieldInfo(f.name, str(f.type), f.default, f.metadata.get("help", "")) for f in dataclasses.fields(TrainConfig)]


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _coerce(name: str, value, type_text: str):
    """Turn a YAML or command-line value into the field's type; raise ValueError with a reason."""
    optional = "None" in type_text
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError("must not be null")
    if type_text.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if type_text.startswith("int | float"):  # a number shown as an int when it is one (epochs: 10)
        number = _coerce(name, value, "float")
        return int(number) if number.is_integer() else number
    if type_text.startswith("int"):
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if type_text.startswith("float"):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ValueError(f"expected a number, got {value!r}")
        return number
    if name == "lora_target":
        if isinstance(value, str):
            return value if value == "all-linear" or "," not in value else [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and value and all(isinstance(s, str) and s for s in value):
            return list(value)
        raise ValueError(f"expected 'all-linear' or a list of module names, got {value!r}")
    if name == "report_to":
        return _report_to(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _report_to(value) -> str:
    """"none" or known dashboard names joined by commas (a YAML list is accepted too), each once."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"expected none or a comma-separated list of {', '.join(REPORT_TO)}, got {value!r}")
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    names = [n for n in dict.fromkeys(names) if n != "none"]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"unknown dashboard {unknown[0]!r}; known: {', '.join(REPORT_TO)} (or none)")
    return ",".join(names) or "none"


def apply_values(config: TrainConfig, values: dict, source: str) -> TrainConfig:
    """A copy of `config` with `values` set, each coerced and checked; errors name `source` and the field."""
    if not isinstance(values, dict):
        raise RtuneError(f"{source}: expected a mapping of field: value, got {type(values).__name__}")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out = dataclasses.replace(config)
    for name, raw in values.items():
        if name not in types:
            close = [k for k in types if k.replace("_", "") == str(name).replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RtuneError(f"{source}: unknown field {name!r}{hint}; known fields: {', '.join(types)}")
        try:
            value = _coerce(name, raw, types[name])
            problem = _CHECKS[name](value) if name in _CHECKS else None
            if problem:
                raise ValueError(problem)
        except ValueError as e:
            raise RtuneError(f"{source}: field {name!r}: {e}") from None
        setattr(out, name, value)
    return out


def load_config(preset_or_yaml_path: str | os.PathLike | None = None, overrides: dict | None = None) -> TrainConfig:
    """The defaults, then a preset ("paper", "cpu") or a YAML file, then `overrides` (e.g. CLI flags).

    A YAML file lists fields to change from the defaults (the files in configs/ list them all).
    Unknown fields and bad values raise RtuneError naming the file and the field.
    """
    config = TrainConfig()
    if preset_or_yaml_path is not None:
        spec = str(preset_or_yaml_path)
        if spec in PRESETS:
            config = apply_values(config, PRESETS[spec], f"preset {spec!r}")
        else:
            path = Path(spec)
            if not path.is_file():
                raise RtuneError(f"config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise RtuneError(f"{path}: not valid YAML: {e}") from None
            config = apply_values(config, data or {}, str(path))
    if overrides:
        config = apply_values(config, {k: v for k, v in overrides.items()}, "command line")
    return config


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def config_from_dict(d: dict, source: str) -> TrainConfig:
    """A config saved by rtune (config.yaml or rtune_run.json), checked like a user file."""
    return apply_values(TrainConfig(), d, source)


def config_differences(saved: TrainConfig, new: TrainConfig, ignore=BOOKKEEPING_FIELDS) -> list[str]:
    """Field names whose values differ (ignoring bookkeeping fields), for resume checks."""
    a, b = saved.to_dict(), new.to_dict()
    return [k for k in a if k not in ignore and a[k] != b[k]]
