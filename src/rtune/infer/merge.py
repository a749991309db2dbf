"""Merge a LoRA run into a standalone model folder.

The result loads with plain `AutoModelForCausalLM.from_pretrained(folder)` and carries the
tokenizer and `rtune_template.json` (the run's renderer), so rtune keeps using the training
template on it. Memory: the base is loaded once, on CPU, and the adapter is merged into it in
place (peft merge_and_unload); no second copy of the weights is ever held.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from rtune import run_folder
from rtune.errors import RtuneError
from rtune.io import atomic_dir
from rtune.models import load_model, quiet_peft, remote_code_allowed

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _base_dtype(spec: str) -> torch.dtype:
    """The dtype the base checkpoint is stored in (bf16 for most modern models), fp32 if unknown."""
    from transformers import AutoConfig

    try:
        dtype = getattr(AutoConfig.from_pretrained(spec, trust_remote_code=remote_code_allowed()), "dtype", None)
    except Exception:  # a .gguf or built-in spec: fall back to full precision
        return torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.replace("torch.", ""))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
    """Write base + adapter of `run_dir` as a standalone model folder at `out_dir`; returns out_dir.

    dtype: the saved weights' dtype (torch dtype or "bf16"/"fp16"/"fp32"); default the base model's.
    """
    from peft import PeftModel

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = run_folder.read_complete_run_info(run_dir, "nothing to merge")
    if info.get("weights") != "adapter":
        raise RtuneError(f"{run_dir} is a full fine-tuning run: {run_folder.weights_dir(run_dir, info)} is already "
                         "a standalone model")
    if out_dir.exists():
        raise RtuneError(f"{out_dir} exists; choose another --out or delete it")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RtuneError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]

    base = info["base_model"]
    dtype = dtype or (torch.float32 if base.get("gguf_file") else _base_dtype(base["path"]))
    # peft computes the low-rank update in fp32 on CPU even for bf16 weights, so merging in the
    # target dtype loses nothing beyond the final rounding and needs one copy of the model.
    if run_folder.base_quantization(info, "merging into"):
        # The adapter was trained against NF4 weights: merge it into those weights, de-quantised.
        model = load_model(base["load"], dtype=dtype, quantization="nf4").dequantize(dtype=dtype).to("cpu")
    else:
        model = load_model(base["load"], dtype=dtype, device=None)
    with quiet_peft():
        model = PeftModel.from_pretrained(model, run_folder.weights_dir(run_dir, info))
    model = model.merge_and_unload()
    renderer = run_folder.load_renderer(run_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        run_folder.save_tokenizer(renderer.tokenizer, renderer, tmp)
        run_folder.write_merged_info(tmp, info, run_dir, dtype)
    del model
    gc.collect()
    return out_dir
