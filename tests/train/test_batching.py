"""Batch planning and padding: deterministic order, nothing lost, padding never trained."""

import torch

from rtune.render import IGNORE, RenderedSequence
from rtune.train.batching import (
    collate_packed,
    collate_padded,
    my_micro_batches,
    plan_batches,
    plan_steps,
    trained_tokens,
)
from rtune.train.config import TrainConfig
from rtune.train.model import lr_at


def _lengths(n=137, seed=1):
    import random

    rng = random.Random(seed)
    return [rng.randint(3, 300) for _ in range(n)]


def test_plan_is_a_pure_function_of_seed_and_epoch():
    lengths = _lengths()
    for group in (False, True):
        a = plan_batches(lengths, 8, seed=0, epoch=2, group_by_length=group)
        assert a == plan_batches(lengths, 8, seed=0, epoch=2, group_by_length=group)
        assert a != plan_batches(lengths, 8, seed=0, epoch=3, group_by_length=group)
        assert a != plan_batches(lengths, 8, seed=1, epoch=2, group_by_length=group)


def test_plan_covers_every_sequence_once():
    lengths = _lengths()
    for group in (False, True):
        batches = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(1 <= len(b) <= 8 for b in batches)
        assert len(batches) == -(-len(lengths) // 8)


def test_plan_does_not_touch_global_rng():
    torch.manual_seed(5)
    import random

    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    plan_batches(_lengths(), 4, seed=0, epoch=0, group_by_length=True)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()


def test_group_by_length_reduces_padding_and_keeps_randomness():
    lengths = _lengths(n=2000)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    grouped = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert padding(grouped) < padding(plain) / 3
    # batch order is shuffled, not sorted by length
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_collate_pads_right_and_masks_padding():
    seqs = [
        RenderedSequence([1, 5, 6, 2], [IGNORE, IGNORE, 6, 2]),
        RenderedSequence([1, 7, 2], [IGNORE, 7, 2]),
        {"input_ids": [1, 2], "labels": [IGNORE, 2]},
    ]
    b = collate_padded(seqs, pad_id=2)  # pad == eos on purpose
    assert b["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 2], [1, 2, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    # the real EOS keeps its label; padding (same id) is never trained
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 6, 2], [IGNORE, 7, 2, IGNORE], [IGNORE, 2, IGNORE, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_packed_is_one_row_with_restarting_positions():
    seqs = [
        RenderedSequence([1, 5, 6, 2], [IGNORE, IGNORE, 6, 2]),
        {"input_ids": [7, 2], "labels": [7, 2]},  # trained at position 0: never predicted across the boundary
        RenderedSequence([1, 8, 2], [IGNORE, 8, 2]),
    ]
    b = collate_packed(seqs)
    assert set(b) == {"input_ids", "labels", "position_ids", "cu_seq_lens"}  # no attention mask
    assert b["input_ids"].tolist() == [[1, 5, 6, 2, 7, 2, 1, 8, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 6, 2, IGNORE, 2, IGNORE, 8, 2]]
    assert b["cu_seq_lens"].tolist() == [0, 4, 6, 9]
    # the same tokens are trained as in a padded batch
    padded = collate_padded(seqs, pad_id=0)
    assert int((b["labels"][:, 1:] != IGNORE).sum()) == int((padded["labels"][:, 1:] != IGNORE).sum())
    assert all(b[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))


def test_trained_tokens_ignores_position_zero():
    assert trained_tokens([5, IGNORE, 3, 4]) == 2
    assert trained_tokens([IGNORE, 3]) == 1


def test_steps_split_the_epoch_and_share_out_evenly():
    lengths = _lengths(n=45)
    config = TrainConfig(batch_size=2, grad_accum=3)
    steps = plan_steps(lengths, config, epoch=0, world_size=2)
    # 23 micro-batches, 6 per step (2 processes x 3) -> 4 steps, the last with 5
    assert [len(s) for s in steps] == [6, 6, 6, 5]
    last = steps[-1]
    r0, r1 = my_micro_batches(last, 0, 2), my_micro_batches(last, 1, 2)
    assert len(r0) == len(r1) == 3  # same number of backward passes on every process
    assert [w for _, w in r1] == [1.0, 1.0, 0.0]  # the filler adds nothing to the gradient
    real = [tuple(b) for b, w in r0 + r1 if w]
    assert sorted(real) == sorted(tuple(b) for b in last)
    assert my_micro_batches(last, 0, 1) == [(b, 1.0) for b in last]


def test_lr_schedules():
    c = TrainConfig(lr=1.0, lr_scheduler="constant")
    assert [lr_at(s, c, 10) for s in range(10)] == [1.0] * 10
    c = TrainConfig(lr=1.0, lr_scheduler="cosine", warmup_ratio=0.2)
    lrs = [lr_at(s, c, 10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0
    c = TrainConfig(lr=1.0, lr_scheduler="linear")
    assert [round(lr_at(s, c, 4), 3) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
