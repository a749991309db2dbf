"""MODEL_OR_RUN -> (model, tokenizer, renderer): what generation, chat, scoring and evaluation load.

A run folder or a merged folder brings the renderer it was trained with (rtune.run_folder); a plain
model spec (hub id, folder, .gguf, built-in name) is prompted with the template asked for, tulu
by default, or with an in-context format (urial, urial-r, zero-shot; `icl_file` holds the
demonstrations, default rtune's own): the untrained baseline.
"""

from __future__ import annotations

import os

import torch

from rtune import run_folder
from rtune.errors import RtuneError


def default_device_dtype(dtype, device):
    """A GPU when there is one (bf16 where supported), else the CPU in fp32."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if dtype is None:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return dtype, device


def check_plain_model_format(model_or_run, template: str | None, icl_file=None) -> None:
    """A run or merged folder has its own template: an in-context format (or demonstrations) is refused."""
    from rtune.render import ICL_TEMPLATES

    if run_folder.has_template(model_or_run) and (template in ICL_TEMPLATES or icl_file is not None):
        flag = f"--icl {template}" if template in ICL_TEMPLATES else "--icl-file"
        raise RtuneError(f"{model_or_run} is a trained model with its own template; {flag} is for plain (untrained) "
                         "models: leave it out, or give the base model instead")


def load_for_inference(model_or_run: str | os.PathLike, template: str | None = None, dtype: torch.dtype | None = None,
                       device=None, *, icl_file: str | os.PathLike | None = None):
    """(model, tokenizer, renderer) for a run folder, a merged folder or a plain model spec.

    `template` only chooses the format for a plain model (default "tulu"; urial, urial-r or
    zero-shot prompt it in context, with the demonstrations of `icl_file` when given); a run or
    merged folder refuses a conflicting one. dtype/device default to bf16 on a GPU when there is
    one, else fp32 on the CPU.
    """
    from rtune.models import load_model, load_tokenizer
    from rtune.models.heads import contiguous_head_input
    from rtune.render import Renderer

    check_plain_model_format(model_or_run, template, icl_file)
    dtype, device = default_device_dtype(dtype, device)
    if run_folder.has_template(model_or_run):
        model, tokenizer, renderer, _ = run_folder.load_run(model_or_run, dtype=dtype, device=device)
        run_folder.check_template(template, renderer, model_or_run)
    else:
        tokenizer = load_tokenizer(model_or_run)
        renderer = Renderer(tokenizer, template or "tulu", icl_file=icl_file)
        model = load_model(model_or_run, dtype=dtype, device=device)
    model.eval()
    contiguous_head_input(model)
    return model, tokenizer, renderer


def load_renderer(model_or_run: str | os.PathLike, template: str | None = None, *,
                  icl_file: str | os.PathLike | None = None):
    """The renderer alone (no weights): a run or merged folder's own, or a plain model's tokenizer + template."""
    from rtune.models import load_tokenizer
    from rtune.render import Renderer

    check_plain_model_format(model_or_run, template, icl_file)
    if run_folder.has_template(model_or_run):
        return run_folder.load_renderer(model_or_run, template)
    return Renderer(load_tokenizer(model_or_run), template or "tulu", icl_file=icl_file)
