"""Sequences -> micro-batches.

Two steps, kept apart so padding-free packing can be added later as another collate function:

    plan_batches   which sequences go together, in which order: a pure function of
                   (lengths, batch_size, seed, epoch), so a resumed run replays the same order
                   and every process of a distributed run computes the same plan.
    collate_*      how one planned batch becomes tensors.

Labels follow the Hugging Face convention: labels[t] is the target of position t and is compared
with the logits of position t-1 (the shift happens in the loss). -100 means "not trained".
"""

from __future__ import annotations

import random

import torch

IGNORE = -100
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


def trained_tokens(labels: list[int]) -> int:
    """Tokens the loss is computed on: labels != -100, except position 0 (nothing predicts it)."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def collate_padded(seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sequences (objects with .input_ids and .labels, or dicts) to one tensor batch.

    The loss mask comes from labels alone (-100 on padding), so the pad id is never trained and
    pad == eos is harmless: the real EOS at the end of each response keeps its label.
    """
    rows = [(s["input_ids"], s["labels"]) if isinstance(s, dict) else (s.input_ids, s.labels) for s in seqs]
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
    # Packing would restart them at each packed sequence instead.
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(rows), -1).clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
