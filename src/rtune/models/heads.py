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
