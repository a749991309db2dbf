"""The running batch's KV cache: rows that joined at different times, left-padded to one width.

Every step feeds one token to every row, so each row's tokens end at the last column and its
padding is on the left: the cache is an ordinary left-padded batch, and HF builds the right masks
from the cache's length and the 2-D attention mask (`mask`, 1 for a real token). Positions are per
row (the row's own token count), so a row's outputs do not depend on its padding.

Rows join with their own prefilled cache (the narrower of the two is padded on the left) and
leave by index; columns that are padding in every remaining row are dropped. Sliding-window layers
(Gemma 3) hold only their last `window - 1` columns, as HF's DynamicSlidingWindowLayer does, and
count the batch width as their length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from rtune.errors import RtuneError


def check_cache(cache) -> None:
    """Refuse a cache this module cannot pad and merge (it knows HF's dynamic full and sliding layers)."""
    if not isinstance(cache, DynamicCache):
        raise RtuneError(f"rtune serve batches a DynamicCache; this model uses {type(cache).__name__}")
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise RtuneError(f"rtune serve cannot batch the cache layer {type(layer).__name__}")


def _columns(layer, width: int) -> int:
    """How many columns a layer holds for a batch `width` columns wide."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(width, layer.sliding_window - 1)
    return width


def _fit(layer, width: int) -> None:
    """Make the layer hold `width` columns' worth: zeros added on the left, or the oldest dropped."""
    want = _columns(layer, width)
    have = layer.keys.shape[-2]
    if want > have:
        pad = (0, 0, want - have, 0)  # (head_dim left/right, seq left/right)
        layer.keys = torch.nn.functional.pad(layer.keys, pad)
        layer.values = torch.nn.functional.pad(layer.values, pad)
    elif want < have:
        layer.keys = layer.keys[:, :, have - want :]
        layer.values = layer.values[:, :, have - want :]
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width


class KVBatch:
    """A DynamicCache of B rows and its [B, width] attention mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        check_cache(cache)
        self.cache, self.mask = cache, mask

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def __len__(self) -> int:
        return self.mask.shape[0]

    def _pad_to(self, width: int) -> None:
        if width > self.width:
            for layer in self.cache.layers:
                _fit(layer, width)
            self.mask = torch.nn.functional.pad(self.mask, (width - self.width, 0))

    def join(self, other: KVBatch) -> None:
        """Append other's rows (after ours)."""
        width = max(self.width, other.width)
        self._pad_to(width)
        other._pad_to(width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop the columns that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        drop = int(used[0]) if len(used) else self.width
        if drop:
            width = self.width - drop
            for layer in self.cache.layers:
                _fit(layer, width)
            self.mask = self.mask[:, drop:]

    def grow(self) -> torch.Tensor:
        """The mask for a step that feeds one more token to every row (and keep it)."""
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        return self.mask
