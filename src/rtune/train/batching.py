"""Sequences -> micro-batches.

Two steps, kept apart:

    plan_batches   which sequences go together, in which order: a pure function of
                   (lengths, batch_size, seed, epoch), so a resumed run replays the same order
                   and every process of a distributed run computes the same plan; `plan_steps`
                   groups them into optimiser steps and `my_micro_batches` deals a step out to
                   the processes.
    collate_*      how one planned batch becomes tensors: `collate_padded` (one row per sequence,
                   right-padded to the longest) or `collate_packed` (all sequences of the batch
                   in one row, no padding). Both train exactly the same tokens, so packing is a
                   speed choice that leaves the optimiser steps (and resume) unchanged.

Labels follow the Hugging Face convention: labels[t] is the target of position t and is compared
with the logits of position t-1 (the shift happens in the loss). -100 means "not trained".
"""

from __future__ import annotations

import math
import random

import torch

from rtune.render import IGNORE
from rtune.train.config import TrainConfig

MEGABATCH_MULT = 50  # group_by_length sorts within chunks of 50 batches: random chunks, little padding


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False) -> list[list[int]]:
    """Indices of the sequences in each micro-batch of one epoch, deterministic for (seed, epoch).

    Without group_by_length: a random permutation cut into batches (the last one may be smaller).
    With group_by_length: a random permutation cut into mega-chunks of MEGABATCH_MULT batches,
    each sorted by length (longest first), cut into batches, and the batch order shuffled again.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    # A private generator: the plan never touches (or depends on) the global RNG state.
    rng = random.Random(f"rtune-plan:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * MEGABATCH_MULT
    batches = []
    for start in range(0, len(order), chunk):
        mega = sorted(order[start : start + chunk], key=lambda i: -lengths[i])  # stable: ties keep random order
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    return batches


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


def fuse_micro_batches(micro: list[tuple[list[int], float]]) -> list[tuple[list[int], float]]:
    """A process's share of a step (my_micro_batches) as one micro-batch, for `fuse_steps`: the loss is
    a sum over tokens normalised by the step's trained tokens, so one packed pass gives the gradient of
    the separate ones. A zero-weight stand-in alone stays as it is (its backward keeps DDP in step)."""
    real = [indices for indices, weight in micro if weight]
    return [([i for indices in real for i in indices], 1.0)] if real else micro


def trained_tokens(labels: list[int]) -> int:
    """Tokens the loss is computed on: labels != -100, except position 0 (nothing predicts it)."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def _ids_and_labels(seq) -> tuple[list[int], list[int]]:
    """A sequence given as an object with .input_ids and .labels, or as a dict with those keys."""
    return (seq["input_ids"], seq["labels"]) if isinstance(seq, dict) else (seq.input_ids, seq.labels)


def collate_padded(seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sequences (objects with .input_ids and .labels, or dicts) to one tensor batch.

    The loss mask comes from labels alone (-100 on padding), so the pad id is never trained and
    pad == eos is harmless: the real EOS at the end of each response keeps its label.
    """
    rows = [_ids_and_labels(s) for s in seqs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        if len(ids) != len(labs):
            raise ValueError(f"sequence {i}: {len(ids)} input ids but {len(labs)} labels")
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, :n] = 1
    # Positions count from 0 in every row (padding continues the count; it is masked anyway).
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(rows), -1).clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def collate_packed(seqs) -> dict[str, torch.Tensor]:
    """Concatenate a batch of sequences into ONE row with no padding ("padding-free packing").

    position_ids restart at 0 for each sequence, which is how the model tells the sequences apart:
    transformers turns such position ids into a block-diagonal causal mask (sdpa, eager) or into
    variable-length attention (flash attention), so no token attends across a boundary and
    rotary positions are those of the sequence alone. There is no attention_mask on purpose (with
    one, transformers would not look for packed sequences).

    The first token of each sequence gets label -100: the last token of the previous sequence must
    not be trained to predict it (an unpacked batch never predicts position 0 either).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    starts = [0]  # sequence boundaries [0, n1, n1+n2, ...]
    for i, s in enumerate(seqs):
        ids, labs = _ids_and_labels(s)
        if len(ids) != len(labs):
            raise ValueError(f"sequence {i}: {len(ids)} input ids but {len(labs)} labels")
        if not ids:
            raise ValueError(f"sequence {i} is empty")
        input_ids.extend(ids)
        labels.extend([IGNORE] + list(labs[1:]))
        position_ids.extend(range(len(ids)))
        starts.append(starts[-1] + len(ids))

    def row(values):
        return torch.tensor([values], dtype=torch.long)

    return {
        "input_ids": row(input_ids),
        "labels": row(labels),
        "position_ids": row(position_ids),
        # The boundaries, for variable-length attention (see packed_attention_kwargs).
        "cu_seq_lens": torch.tensor(starts, dtype=torch.int32),
    }


# ----------------------------------------------------------------------------------------------
# Attention over packed rows


def packed_attention_kwargs(batch: dict) -> dict:
    """The keyword arguments that tell attention where the sequences of a packed row begin and end.

    transformers hands them down to the attention function: flash attention runs variable-length
    attention with them, `varlen_sdpa_attention` (CPU) loops over the sequences, and sdpa/eager
    ignore them (they use the block-diagonal mask built from the position ids instead).
    """
    cu = batch.get("cu_seq_lens")
    if cu is None:
        return {}
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


VARLEN_SDPA = "rtune_varlen_sdpa"


def varlen_sdpa_attention(module, query, key, value, attention_mask, sliding_window=None, cu_seq_lens_q=None,
                          **kwargs):
    """sdpa one sequence at a time over a packed row: attention costs sum(n_i^2), not (sum n_i)^2.

    A block-diagonal mask over the whole row makes CPU attention compute every block, masked or
    not; slicing each sequence out and running causal sdpa on it does only the useful part. Any
    other input (a padded batch, generation) goes to plain sdpa with its mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.size(0) != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, sliding_window=sliding_window,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = None  # plain causal attention within the sequence
        if sliding_window is not None and end - start > sliding_window:
            i = torch.arange(end - start, device=query.device)
            distance = i[:, None] - i[None, :]  # query position - key position
            mask = ((distance >= 0) & (distance < sliding_window))[None, None]
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], mask, is_causal=mask is None, **kwargs)
        outputs.append(out)  # [1, n_i, heads, head_dim]
    return torch.cat(outputs, dim=1), None


def register_varlen_sdpa() -> str:
    """Make VARLEN_SDPA a transformers attention implementation (with sdpa's masks for other inputs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA
