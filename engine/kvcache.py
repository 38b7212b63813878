"""The running batch's KV cache: one left-padded tensor pair per layer, plus the mask.

Design (correctness first):

- A request is prefilled alone (chunk by chunk) into its own ``DynamicCache``; no padding,
  so its prompt sees exactly what it would see running alone.
- When its prefill completes, its keys/values are spliced into the batch cache: every row
  is left-padded to the longest row, and ``mask`` ``[B, L]`` marks real positions (1) and
  padding (0). Each row keeps its own position ids (its real length), so rotary
  embeddings match the row alone; padded keys are masked out of attention.
- A decode step feeds one token per row with ``attention_mask = [mask | 1]`` and
  ``position_ids = lengths``; the cache grows by one column for every row.
- A row that finishes or is cancelled is dropped with one ``index_select``; columns that
  became padding in every row are trimmed from the left.

Costs: splicing a row or dropping rows copies the whole batch cache once (O(B x L) per
layer) — only when membership changes. A decode step concatenates one column
(``DynamicCache.update`` copies, O(B x L) per layer, as HF's own ``generate`` does with a
DynamicCache); the cache is handed to the model without another copy (``wrap``).
Padding wastes attention compute and memory in proportion to the spread of row lengths
(a 2k-token row beside 10-token rows pads them all to 2k). A paged cache would remove
both costs; it needs a custom attention path and is left for later.

Only full-attention layers are supported (``DynamicLayer``); sliding-window or hybrid
caches (Gemma 2, some Mistral configs) are not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]  # ([B, H_kv, L, D], [B, H_kv, L, D])


def cache_tensors(cache: DynamicCache) -> list[KV]:
    """Per-layer (keys, values) of a DynamicCache."""
    out: list[KV] = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)  # full-attention layers only (see above)
        values = getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"cache layer {type(layer).__name__} holds no keys/values "
                             "(only full-attention caches are supported)")
        out.append((keys, values))
    return out


class BatchCache:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.layers: list[KV] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, L] 1 = real position
        self.lengths: list[int] = []  # real tokens per row (its next position id)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def add(self, row: list[KV], length: int) -> None:
        """Append one prefilled row (``[1, H, length, D]`` per layer) as the last row."""
        if not self.layers:
            self.layers = [(k.clone(), v.clone()) for k, v in row]
            self.mask = torch.ones(1, length, dtype=torch.long, device=row[0][0].device)
            self.lengths = [length]
            return
        width = max(self.width, length)
        grown: list[KV] = []
        for (bk, bv), (rk, rv) in zip(self.layers, row, strict=True):
            grown.append((torch.cat([_left_pad(bk, width), _left_pad(rk, width)]),
                          torch.cat([_left_pad(bv, width), _left_pad(rv, width)])))
        self.layers = grown
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)),
                               F.pad(row_mask, (width - length, 0))])  # [B + 1, width]
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); trim all-padding columns on the left."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)  # [B', L]
        used = int(mask.any(dim=0).nonzero().min())  # first column some row still uses
        self.mask = mask[:, used:]
        self.layers = [(k.index_select(0, index)[:, :, used:],
                        v.index_select(0, index)[:, :, used:]) for k, v in self.layers]
        self.lengths = [self.lengths[r] for r in rows]

    def step_inputs(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """``(cache, attention_mask [B, L + 1], position_ids [B, 1])`` for one decode step."""
        cache = wrap(self.layers)
        ones = torch.ones(self.rows, 1, dtype=torch.long, device=self.mask.device)
        attention = torch.cat([self.mask, ones], dim=1)  # [B, L + 1]
        positions = torch.tensor(self.lengths, dtype=torch.long,
                                 device=self.mask.device).unsqueeze(1)  # [B, 1]
        return cache, attention, positions

    def advance(self, cache: DynamicCache, attention: torch.Tensor) -> None:
        """Take the grown cache back after a decode step."""
        self.layers = cache_tensors(cache)
        self.mask = attention
        self.lengths = [n + 1 for n in self.lengths]


def wrap(layers: list[KV]) -> DynamicCache:
    """A DynamicCache over ``layers`` without copying them (``DynamicCache(ddp_cache_data=)``
    would concatenate each onto an empty tensor: one more full copy per step)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()  # type: ignore[no-untyped-call]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, L, D] -> [B, H, width, D]`` with zeros on the left of the sequence."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))
