"""One decode step of 31 short rows beside one long row vs 32 short rows, over the
engine's KV slab and its packed step: attention grouped by row length (what the engine
runs) and as one SDPA over the longest row. Run as ``python -m bench.decode_step
--long-row`` (it shares that module's model and paired timing)."""

from __future__ import annotations

import argparse

import torch

from bench.decode_step import build_model, paired_ms
from tessera.engine import attention
from tessera.engine.kvcache import BatchCache, ChunkKV

CPU = torch.device("cpu")


class SlabStep:
    """The engine's batch KV slab holding rows of ``lengths`` tokens (random prefilled
    keys/values); ``run()`` is one decode step that leaves the slab as it was."""

    def __init__(self, model: torch.nn.Module, lengths: list[int], *,
                 grouped: bool = False) -> None:
        gen = torch.Generator().manual_seed(2)
        self.model = model
        self.cache = BatchCache(grouped=grouped)
        self.layers = int(model.config.num_hidden_layers)
        with torch.no_grad():
            for n in lengths:  # one prefill each (the engine's packed step, one chunk):
                inputs = self.cache.packed([], [ChunkKV(0, n, None)], self.layers, CPU,
                                           torch.float32)  # real keys at real positions
                model(input_ids=torch.randint(0, 4096, (1, n), generator=gen),
                      position_ids=torch.arange(n).unsqueeze(0), logits_to_keep=1,
                      **inputs.kwargs())
                self.cache.add(inputs.chunk_kv(0), n)
        self.next_ids = torch.randint(0, 4096, (1, len(lengths)), generator=gen)  # [1, B]
        self.positions = torch.tensor([lengths])  # [1, B]

    @torch.no_grad()
    def run(self) -> None:
        """The engine's packed step with decode rows only (lengths unchanged: same step)."""
        inputs = self.cache.packed(list(range(self.cache.rows)), [], self.layers, CPU,
                                   torch.float32)
        self.model(input_ids=self.next_ids, position_ids=self.positions, **inputs.kwargs())


def long_row(args: argparse.Namespace) -> list[dict[str, object]]:
    model = build_model(args)
    attention.install(model)
    lengths = [args.prompt] * (args.batch - 1) + [args.long]
    short = SlabStep(model, [args.prompt] * args.batch)
    plain = SlabStep(model, lengths)  # one SDPA over the whole width (the old step)
    grouped = SlabStep(model, lengths, grouped=True)  # what the engine runs
    ms = paired_ms({"short": short.run, "plain": plain.run, "grouped": grouped.run},
                   args.reps)
    return [{"rows": args.batch, "short": args.prompt, "long": args.long,
             "short_ms": ms["short"], "long_plain_ms": ms["plain"],
             "long_ms": ms["grouped"], "plain_ratio": ms["plain"] / ms["short"],
             "ratio": ms["grouped"] / ms["short"]}]
