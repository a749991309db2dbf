"""The training loss: summed token cross-entropy over trained positions only.

A causal LM's output layer maps every position to the whole vocabulary. With Gemma 3's 262,144
tokens, the [positions x vocabulary] logits of a batch of 8 x 512 tokens are 4 GiB in fp32, and the
output layer costs more than the rest of a 270M model. So:

1. Only positions whose NEXT token is trained go through the output layer (labels[t+1] != -100):
   no prompt, no padding, no last token.
2. Those positions go through it in row chunks and vocabulary tiles; the logits of one tile are
   upcast to fp32 and used at once. Pass 1 accumulates the log-sum-exp of each row over the tiles
   (online, as flash attention does); pass 2 forms each tile's gradient, softmax - one-hot, and
   multiplies it into the gradients of the hidden states (and of the output weight when it is
   trained). The gradients are computed during the forward pass: the loss is a scalar that is
   only scaled before backward, so backward just scales them and no logits are kept.
3. On CPUs, tiles are small enough to stay in cache (~8 MiB): memory bandwidth, not arithmetic, is
   what the [rows x vocabulary] work costs there, so pass 2 recomputes each tile's logits rather
   than reading them back. On GPUs the whole vocabulary is one tile, kept between the passes.

`token_loss_sum(..., impl="full")` is the plain reference: the model's full logits and one
cross-entropy. Tests check that both give the same loss and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rtune.models.heads import causal_lm_parts, gpu_row_chunk
from rtune.render import IGNORE
from rtune.train.batching import packed_attention_kwargs
from rtune.train.config import TrainConfig

CPU_TILE_BYTES = 8 * 2**20  # fp32 logits of one tile on CPU: stays in L2/L3 cache
CPU_ROWS = 1024  # rows per chunk on CPU: each chunk reads the output weight twice
# check_output_head: positions compared (cheap even for a 262k vocabulary), and how far apart the
# losses may be. Measured: bf16 autocast rounding (Gemma's soft-cap, done in bf16 by the model)
# moves the sum of 128 positions by up to 2e-3; a logit scale of 1/8 moves it by 10% (tiny random
# models) to over 100% (trained ones).
HEAD_CHECK_TOKENS = 256
HEAD_CHECK_RTOL = 1e-2


def tiling(n_rows: int, vocab: int, device_type: str, rows: int = 0) -> tuple[int, int]:
    """(rows per chunk, vocabulary entries per tile). `rows` > 0 overrides the row chunk."""
    if device_type == "cpu":
        rows = rows or CPU_ROWS
        tile = CPU_TILE_BYTES // (4 * max(1, min(rows, n_rows)))
        return rows, min(vocab, max(32, tile // 32 * 32))
    return rows or gpu_row_chunk(vocab), vocab


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`. A frozen one (the output layer under LoRA) is cast once and the copy kept
    on the weight itself (its version counter tells when it changed in place), not at every
    micro-batch: ~0.2 s on 2 CPU cores for Gemma 3's 168M-entry embedding matrix."""
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad:
        return weight.detach().to(dtype)
    cached = getattr(weight, "_rtune_cast", None)
    if cached is None or cached[0] != weight._version or cached[1] != dtype:
        cached = (weight._version, dtype, weight.detach().to(dtype))
        weight._rtune_cast = cached
    return cached[2]


def _tile_logits(h, w_tile, softcap):
    """fp32 logits of one tile and, with a soft-cap, tanh(z / cap) (for the derivative)."""
    z = (h @ w_tile.T).float()
    if not softcap:
        return z, None
    tanh = z.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _targets_in_tile(targets, start, end):
    """(rows whose target is in [start, end), their columns within the tile)."""
    rows = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
    return rows, targets[rows] - start


def _linear_ce(hidden, weight, targets, softcap, rows, tile, compute_dtype, want_h, want_w):
    """(summed loss, d loss / d hidden or None, d loss / d weight or None), tile by tile."""
    w = _cast_weight(weight, compute_dtype)
    vocab = w.size(0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    for r0 in range(0, hidden.size(0), rows):
        h, t = hidden[r0 : r0 + rows].to(compute_dtype), targets[r0 : r0 + rows]
        n = h.size(0)
        # Pass 1: log-sum-exp over the tiles, kept stable with a running maximum; target logits.
        run_max = torch.full((n,), -math.inf, device=h.device)
        run_sum = torch.zeros(n, device=h.device)
        target_logit = torch.zeros(n, device=h.device)
        kept = None
        for v0 in range(0, vocab, tile):
            z, tanh = _tile_logits(h, w[v0 : v0 + tile], softcap)
            hit, col = _targets_in_tile(t, v0, v0 + z.size(1))
            target_logit[hit] = z[hit, col]
            new_max = torch.maximum(run_max, z.amax(dim=1))
            if tile >= vocab:
                kept = (z, tanh)  # one tile: pass 2 reuses it
                shifted = z - new_max[:, None]
            else:
                shifted = z.sub_(new_max[:, None])  # in place: the same numbers, one pass over the tile less
            run_sum = run_sum * torch.exp(run_max - new_max) + shifted.exp_().sum(dim=1)
            run_max = new_max
        lse = run_max + run_sum.log()
        total += (lse - target_logit).sum()
        if not (want_h or want_w):
            continue
        # Pass 2: d loss / d logits = softmax - one-hot, per tile, into the hidden/weight gradients.
        acc = torch.zeros(n, h.size(1), dtype=torch.float32, device=h.device) if want_h else None
        for v0 in range(0, vocab, tile):
            z, tanh = kept if kept is not None else _tile_logits(h, w[v0 : v0 + tile], softcap)
            g = z.sub_(lse[:, None]).exp_()
            hit, col = _targets_in_tile(t, v0, v0 + g.size(1))
            g[hit, col] -= 1.0
            if tanh is not None:
                g.mul_(tanh.square_().neg_().add_(1.0))  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
            g = g.to(compute_dtype)
            if want_h:
                acc += (g @ w[v0 : v0 + tile]).float()
            if want_w:
                grad_w[v0 : v0 + tile] += (g.T @ h).float()
        kept = None
        if want_h:
            grad_h[r0 : r0 + rows] = acc
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]), with the gradients computed in forward (see above)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, rows, tile, compute_dtype):
        total, grad_h, grad_w = _linear_ce(hidden, weight, targets, softcap, rows, tile, compute_dtype,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_linear_ce_sum(hidden, weight, targets, softcap=None, chunk: int = 0) -> torch.Tensor:
    """Summed fp32 cross-entropy of `hidden` [n, H] through the output layer `weight` [V, H].

    Matmuls run in the autocast dtype when autocast is on (as nn.Linear would), the softmax in fp32.
    `chunk` > 0 sets the rows per chunk (else see `tiling`).
    """
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    rows, tile = tiling(hidden.size(0), weight.size(0), device_type, chunk)
    # Our own dtypes inside; autocast would otherwise re-cast every tile's matmul.
    with torch.autocast(device_type, enabled=False):
        if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
            return _linear_ce(hidden, weight, targets, softcap, rows, tile, compute_dtype, False, False)[0]
        return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, rows, tile, compute_dtype)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t+1]: what position t predicts (-100 at the end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def token_loss_sum(model, batch: dict, autocast, impl: str = "chunked", chunk: int = 0) -> torch.Tensor:
    """Sum (not mean) of the token cross-entropies over the trained tokens of a batch, in fp32.

    The caller divides by the trained tokens of the whole optimiser step, so nothing here averages
    per micro-batch. `batch` has input_ids, labels, position_ids and, for padded batches,
    attention_mask; packed batches have none (the position ids mark the sequences) but cu_seq_lens.
    impl: "chunked" (trained positions only, output layer in chunks), "liger" (the same with Liger
    Kernel's fused kernels, CUDA) or "full" (the reference).
    """
    targets = shifted_targets(batch["labels"])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch["position_ids"], use_cache=False, **packed_attention_kwargs(batch))
    parts = causal_lm_parts(model) if impl != "full" else None
    if parts is None:
        with autocast:
            logits = model(**inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    body, head, softcap = parts
    with autocast:
        hidden = body(**inputs).last_hidden_state
        keep = targets != IGNORE
        if impl == "liger":
            return liger_linear_ce_sum(hidden[keep], head.weight, targets[keep], softcap)
        return chunked_linear_ce_sum(hidden[keep], head.weight, targets[keep], softcap, chunk)


def liger_linear_ce_sum(hidden, weight, targets, softcap=None) -> torch.Tensor:
    """chunked_linear_ce_sum by Liger Kernel's fused linear cross-entropy (Triton kernels, CUDA only):
    the same summed loss, with the matmuls in the autocast dtype as nn.Linear would run them."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", **({"softcap": softcap} if softcap else {}))
    w = weight.to(dtype) if weight.requires_grad else _cast_weight(weight, dtype)  # a trained head keeps its graph
    with torch.autocast(device_type, enabled=False):
        return loss(w, hidden.to(dtype), targets).float()


class LossModel(torch.nn.Module):
    """A causal LM together with its summed token loss (token_loss_sum), as one module.

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
        # checkpoint_tokens: which layers recompute is decided per micro-batch (rtune.train.model);
        # not under torch.compile, whose graphs would be recompiled for every new choice.
        self.checkpoint_tokens = 0
        if config.checkpoint_tokens and not config.gradient_checkpointing and not config.compile:
            from rtune.train.model import checkpoint_layers

            self.checkpoint_tokens = config.checkpoint_tokens
            self._layers = checkpoint_layers(model)

    def forward(self, batch: dict[str, torch.Tensor], impl: str | None = None) -> torch.Tensor:
        if self.checkpoint_tokens:
            from rtune.train.model import layers_to_checkpoint

            n = layers_to_checkpoint(batch["input_ids"].numel(), self.checkpoint_tokens, len(self._layers))
            for i, layer in enumerate(self._layers):
                layer.gradient_checkpointing = i < n
        # bf16 is our own autocast (fp32 master weights, loss in fp32); see rtune.train.recipe.
        autocast = torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16)
        return token_loss_sum(self.model, batch, autocast, impl or self.impl, self.chunk)


def check_output_head(loss_model, model, batch: dict[str, torch.Tensor]) -> str | None:
    """Why the chunked loss is not `model`'s own loss on `batch`, or None when it is.

    The chunked loss re-implements the output layer (hidden states @ output weight, Gemma's
    soft-cap). A head that also scales its logits (Granite's logits_scaling, Cohere's logit_scale,
    Falcon-H1's lm_head_multiplier) would silently train another objective, so both losses are
    compared once on a real batch, before accelerate wraps the model (rtune.train.recipe.setup_model).
    """
    impl = loss_model.impl if loss_model.impl != "full" else "chunked"  # chunked or liger: both re-implement it
    if causal_lm_parts(model) is None:
        return f"the model has no separate output layer for the {impl} loss"
    was_training = loss_model.training
    loss_model.eval()  # no dropout: both losses see the same function, and no random numbers are drawn
    try:
        with torch.no_grad():
            ours, full = (float(loss_model(batch, impl=i)) for i in (impl, "full"))
    finally:
        loss_model.train(was_training)
    if abs(ours - full) <= HEAD_CHECK_RTOL * abs(full):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (f"{type(base).__name__}: the {impl} loss ({ours:.4f}) differs from the model's own "
            f"({full:.4f}); its output layer must do more than a matmul (a logit scale?)")
