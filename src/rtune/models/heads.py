"""The output head of a causal LM, shared by training (the chunked loss) and scoring (log-probs)."""

from __future__ import annotations

import torch

GPU_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one row chunk (whole vocabulary) on GPUs


def gpu_row_chunk(vocab: int) -> int:
    """Rows per chunk on GPUs: the whole vocabulary is one tile, ~256 MiB of fp32 logits per chunk."""
    return max(16, GPU_CHUNK_BYTES // (4 * vocab))


def causal_lm_parts(model):
    """(decoder body, output layer, final logit soft-cap or None) of a causal LM, peft-wrapped or not.

    The body returns the last hidden states (after the final norm); the output layer maps them to
    logits. Returns None when the model does not have this common layout: use impl="full" then.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped model
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or body is base or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return body, head, softcap


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model) -> None:
    """Hand the output layer a contiguous input when generating.

    HF's generate keeps the last position's hidden states as a strided slice ([batch, 1, hidden]
    of [batch, prompt, hidden]). On CPUs, torch 2.13's linear on such a slice with a weight that does
    not require grad (any frozen or merged model) runs a batched matmul over one copy of the weight
    per row: with Gemma's 262k x 640 output layer and a batch of 24, 24 s and 8 GB more memory per
    prefill instead of 0.03 s (measured: docs/results.md, "Where the memory went"). A copy of the slice
    costs [batch x hidden] values.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_rtune_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._rtune_contiguous_input = True
