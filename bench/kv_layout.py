"""Decode attention on a CPU: the engine's KV slab vs a paged block pool.

    python -m bench.kv_layout --reps 12

Why this exists: issue 8 asked for a paged KV cache (fixed-size blocks, a block table per
row). No paged-attention kernel runs on the CPU, so attention over blocks has to gather
each row's blocks into a contiguous tensor first; the engine keeps a slab instead
(:mod:`tessera.engine.kvcache`) and attends over views of it. This measures that choice:
the decode attention of every layer of one step (queries ``[B, H, 1, D]``, fp32), for

- ``slab``: what the engine runs — :func:`tessera.engine.attention.decode_attention` over
  views of ``[B, H, C, D]`` slabs, grouped by row length by
  :func:`tessera.engine.attention.plan`;
- ``paged``: a block pool per layer ``[blocks, block, H, D]`` (token-major, as vLLM's and
  transformers' caches lay it out), each row's blocks scattered over the pool as after
  some churn; rows sorted by length and cut into groups of at most ``--group-mb`` of keys
  (so a group's gathered keys and values stay in the last-level cache), each group's
  blocks gathered by ``index_select`` into a preallocated workspace (no allocation per
  step) and attended by one SDPA over ``[G, H, L, D]`` views — the best of the paged forms
  tried (head-major pools and gathers of the whole batch were slower).

Both are checked equal (fp32, ``allclose``) before timing. Cases: 32 rows of equal length
(the throughput workload's decode), 32 rows of mixed lengths, 31 short rows beside one
1,024-token row. Timed in turns (:func:`bench.decode_step.paired_ms`), median of
``--reps``. Writes ``bench/results/kv_layout.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.decode_step import paired_ms
from tessera.engine.attention import decode_attention, plan

OUT = Path(__file__).parent / "results" / "kv_layout.json"


class _Attention(torch.nn.Module):
    """What transformers' SDPA wrapper reads off an attention module."""

    is_causal = True
    num_key_value_groups = 1


class Slab:
    """Per layer ``[B, H, C, D]`` keys/values; one decode step as the engine attends it."""

    def __init__(self, lengths: list[int], heads: int, dim: int, layers: int,
                 gen: torch.Generator) -> None:
        b, width = len(lengths), max(lengths) + 1  # each row's tokens and its new one
        capacity = width + 63  # the engine's slab keeps spare length
        self.layers = [(torch.randn(b, heads, capacity, dim, generator=gen),
                        torch.randn(b, heads, capacity, dim, generator=gen))
                       for _ in range(layers)]
        self.width = width
        self.groups = plan(lengths, torch.device("cpu"), torch.float32)
        span = torch.arange(width).unsqueeze(0)  # [1, W + 1]
        attend = span <= torch.tensor(lengths).unsqueeze(1)  # [B, W + 1]
        self.mask = torch.zeros(attend.shape).masked_fill(
            ~attend, torch.finfo(torch.float32).min)[:, None, None, :]  # [B, 1, 1, W + 1]
        self.module = _Attention()

    def step(self, query: torch.Tensor) -> list[torch.Tensor]:
        """query: [B, H, 1, D] -> per layer [B, 1, H, D]."""
        return [decode_attention(self.module, query, k[:, :, :self.width],
                                 v[:, :, :self.width], self.mask, self.groups)
                for k, v in self.layers]


class Paged:
    """The same keys/values in per-layer block pools ``[N, block, H, D]``; one decode step
    as a paged cache without a paged kernel must attend it (gather, then SDPA)."""

    def __init__(self, slab: Slab, lengths: list[int], block: int, group_bytes: int,
                 gen: torch.Generator) -> None:
        heads, dim = slab.layers[0][0].shape[1], slab.layers[0][0].shape[3]
        counts = [-(-(n + 1) // block) for n in lengths]  # blocks per row (its new token too)
        total = sum(counts)
        order = torch.randperm(total, generator=gen).tolist()  # scattered, as after churn
        tables: list[list[int]] = []
        for c in counts:
            tables.append(order[:c])
            order = order[c:]
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k, v in slab.layers:  # copy the slab's rows into their blocks
            pk = torch.zeros(total, block, heads, dim)  # [N, block, H, D]
            pv = torch.zeros(total, block, heads, dim)
            for i, table in enumerate(tables):
                span = counts[i] * block
                rows_k = torch.zeros(span, heads, dim)
                rows_v = torch.zeros(span, heads, dim)
                n = min(span, k.shape[2])
                rows_k[:n] = k[i, :, :n].transpose(0, 1)
                rows_v[:n] = v[i, :, :n].transpose(0, 1)
                pk[table] = rows_k.view(counts[i], block, heads, dim)
                pv[table] = rows_v.view(counts[i], block, heads, dim)
            self.layers.append((pk, pv))
        by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
        per_position = heads * dim * 4  # bytes of one position's keys
        self.groups: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []
        group: list[int] = []
        for i in [*by_length, None]:
            if group and (i is None or (len(group) + 1) * counts[i] * block * per_position
                          > group_bytes):
                width = max(counts[j] for j in group)  # blocks: the group's longest row
                blocks = torch.tensor([  # [G * width]: short rows repeat their last block
                    tables[j][min(c, counts[j] - 1)] for j in group for c in range(width)])
                span = torch.arange(width * block).unsqueeze(0)  # [1, L]
                attend = span <= torch.tensor([lengths[j] for j in group]).unsqueeze(1)
                mask = torch.zeros(attend.shape).masked_fill(
                    ~attend, torch.finfo(torch.float32).min)[:, None, None, :]  # [G,1,1,L]
                self.groups.append((torch.tensor(group), blocks, width, mask))
                group = []
            if i is not None:
                group.append(i)
        most = max(int(blocks.numel()) for _, blocks, _, _ in self.groups)
        self.block, self.heads, self.dim = block, heads, dim
        self.work = (torch.empty(most, block, heads, dim), torch.empty(most, block, heads, dim))

    def step(self, query: torch.Tensor) -> list[torch.Tensor]:
        """query: [B, H, 1, D] -> per layer [B, 1, H, D]."""
        outs = []
        for pk, pv in self.layers:
            out = query.new_empty(query.shape[0], self.heads, 1, self.dim)  # [B, H, 1, D]
            for rows, blocks, width, mask in self.groups:
                n, g = int(blocks.numel()), int(rows.numel())
                k, v = self.work[0][:n], self.work[1][:n]  # [G * width, block, H, D]
                torch.index_select(pk, 0, blocks, out=k)
                torch.index_select(pv, 0, blocks, out=v)
                span = width * self.block
                part = F.scaled_dot_product_attention(  # [G, H, 1, D]
                    query.index_select(0, rows),
                    k.view(g, span, self.heads, self.dim).transpose(1, 2),
                    v.view(g, span, self.heads, self.dim).transpose(1, 2), attn_mask=mask)
                out.index_copy_(0, rows, part)
            outs.append(out.transpose(1, 2))  # [B, 1, H, D]
        return outs


def cases(batch: int, long: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {"equal": [192] * batch,
            "mixed": [rng.randint(128, 256) for _ in range(batch)],
            "long_row": [170] * (batch - 1) + [long]}


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    torch.set_num_threads(args.threads)
    results: list[dict[str, object]] = []
    for name, lengths in cases(args.batch, args.long).items():
        gen = torch.Generator().manual_seed(3)
        slab = Slab(lengths, args.heads, args.head_dim, args.layers, gen)
        query = torch.randn(len(lengths), args.heads, 1, args.head_dim, generator=gen)
        fns: dict[str, Callable[[], object]] = {"slab": partial(slab.step, query)}
        for mb in args.group_mb:
            paged = Paged(slab, lengths, args.block, int(mb * 2**20), gen)
            with torch.no_grad():
                for a, b in zip(slab.step(query), paged.step(query), strict=True):
                    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
                        raise RuntimeError(f"{name}: paged attention differs from the slab's")
            fns[f"paged_{mb:g}mb"] = partial(paged.step, query)
        with torch.no_grad():
            ms = paired_ms(fns, args.reps)
        row: dict[str, object] = {"case": name, "rows": len(lengths),
                                  "lengths": f"{min(lengths)}-{max(lengths)}",
                                  "slab_ms": round(ms["slab"], 2)}
        for key, value in ms.items():
            if key != "slab":
                row[f"{key}_ms"] = round(value, 2)
                row[f"{key}_ratio"] = round(value / ms["slab"], 2)
        results.append(row)
        print(row, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--group-mb", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": args.threads, "layers": args.layers, "heads": args.heads,
        "head_dim": args.head_dim, "block": args.block, "reps": args.reps,
        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
