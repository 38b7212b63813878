"""Decode steps as CUDA graphs: captured once per padded batch size, then replayed.

A decode step launches a few hundred small kernels (every projection, its adapter
kernels, attention, norms) whose launch cost is most of the step at decode batch sizes
on a GPU; a CUDA graph replays the recorded launches at once. A graph replays fixed
kernels on fixed addresses, so a step is captured only where nothing in it depends on
the step beyond its padded size:

- decode only (no prefill chunk), its rows padded up to a bucket (:data:`BUCKETS`): the
  padding rows are base tokens (slot -1, token 0, position 0) in free slab rows
  ``[B, n)``, writing their key at position 0 there (those rows hold no running row);
- the decode attention on the Triton kernel, which reads each row's length on the
  device (no mask, no plan by length: :meth:`BatchCache.static`);
- the adapters through a static plan (:meth:`SlotPool.use_static`): every wrapped layer
  runs its low-rank bank's Triton kernels over the tokens grouped by slot, every slot a
  group (empty ones do nothing), at the bank's padded rank, then its row-scale bank's
  ``g`` of each token's slot (ones for every slot without one). That covers LoRA, rsLoRA,
  DoRA and HRA; a step using any other method's slot, or a hot merge, runs eagerly;
- every device input in buffers this object owns: the step's ids, positions, slots,
  packed order, lengths and groups are written into one host staging buffer and copied
  in one transfer, before the graph replays (:class:`_Inputs`).

The slabs' addresses are part of a graph: when the slabs grow (new tensors,
``BatchCache.generation``), the graphs are captured again. The first capture of each size
is checked against the same step run eagerly; a failed or differing capture turns graphs
off for the engine (logged), which then runs every step eagerly.

``mode`` (``EngineSettings.decode_graphs``): ``auto`` captures on CUDA where the pool and
the attention run the Triton kernels; ``eager`` runs the same static steps without
capturing them (any device where the Triton kernels run: how the CPU tests check the
static step's tokens, in Triton's interpreter); ``off`` never.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tessera.adapters import SlotPool
from tessera.adapters.ops import Backend
from tessera.adapters.plan import Groups
from tessera.engine.kvcache import BatchCache

log = logging.getLogger(__name__)

Mode = Literal["auto", "eager", "off"]
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
FIELDS = ("ids", "positions", "slots", "index", "lengths", "order")  # [n] each


def buckets(max_rows: int) -> list[int]:
    """The padded sizes of decode steps up to ``max_rows`` rows (the largest is
    ``max_rows`` itself where no bucket is)."""
    sizes = [n for n in BUCKETS if n < max_rows]
    return [*sizes, max_rows]


class _Inputs:
    """The static step's device inputs: one host staging buffer (pinned on CUDA) and one
    device buffer of the same layout, each field a fixed view; a step of ``n`` padded rows
    reads the first ``n`` of each ``[N]`` field."""

    def __init__(self, rows: int, slots: int, device: torch.device) -> None:
        self.rows, self.slots = rows, slots
        size = len(FIELDS) * rows + 2 * slots
        pin = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=pin)  # staging
        self.device = torch.zeros(size, dtype=torch.long, device=device)
        self.every_slot = torch.arange(slots, device=device)  # [S]: group g is slot g

    def _field(self, buffer: torch.Tensor, name: str, n: int) -> torch.Tensor:
        at = FIELDS.index(name) * self.rows
        return buffer[at:at + n]  # [n]

    def host_field(self, name: str, n: int) -> torch.Tensor:
        return self._field(self.host, name, n)

    def field(self, name: str, n: int) -> torch.Tensor:
        return self._field(self.device, name, n)

    def groups(self, n: int) -> Groups:
        """The tokens of a step of ``n`` rows grouped over every slot."""
        base = len(FIELDS) * self.rows
        return Groups(order=self.field("order", n), slots=self.every_slot,
                      starts=self.device[base:base + self.slots],
                      lengths=self.device[base + self.slots:base + 2 * self.slots],
                      longest=n)

    def write(self, n: int, tokens: list[int], positions: list[int], slots: list[int],
              at: list[int], lengths: list[int]) -> None:
        """Stage one step (``b`` real rows in packed order, padded to ``n``) and copy it
        to the device in one transfer (asynchronous; the previous step's copy is done: its
        sampled tokens came back since)."""
        b = len(tokens)
        pad = n - b
        self.host.zero_()
        self.host_field("ids", n)[:b] = torch.tensor(tokens)
        self.host_field("positions", n)[:b] = torch.tensor(positions)
        self.host_field("slots", n).copy_(torch.tensor([*slots, *[-1] * pad]))
        self.host_field("index", n).copy_(torch.tensor([*at, *range(b, n)]))
        self.host_field("lengths", n)[:b] = torch.tensor(lengths)
        host_slots = torch.tensor(slots, dtype=torch.long)  # [B]
        order = torch.argsort(host_slots, stable=True)  # [B]: by slot (already, packed)
        routed = order[host_slots[order] >= 0]  # [M] tokens of some slot
        self.host_field("order", n)[:routed.shape[0]] = routed
        counts = torch.bincount(host_slots[routed], minlength=self.slots)  # [S]
        base = len(FIELDS) * self.rows
        self.host[base + self.slots:base + 2 * self.slots] = counts
        self.host[base + 1:base + self.slots] = torch.cumsum(counts, 0)[:-1]
        self.device.copy_(self.host, non_blocking=True)


@dataclass
class _Graph:
    generation: int  # the slabs' generation it was captured on
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [n, V]: the captured forward's output, rewritten by each replay


def build(mode: Mode, model: nn.Module, pool: SlotPool, attention: Backend, layers: int,
          device: torch.device, dtype: torch.dtype, max_rows: int) -> DecodeGraphs | None:
    """The static decode steps ``mode`` asks for, where the pool and the decode attention
    both run the Triton kernels; None: every step eager."""
    if mode == "off" or pool.backend != "triton" or attention != "triton":
        return None
    if mode == "auto" and device.type != "cuda":
        return None
    return DecodeGraphs(model, pool, layers, device, dtype, max_rows,
                        capture=mode == "auto")


class DecodeGraphs:
    """The static decode step and its CUDA graphs, one per padded size. Used from the
    forward thread only."""

    def __init__(self, model: nn.Module, pool: SlotPool, layers: int, device: torch.device,
                 dtype: torch.dtype, max_rows: int, capture: bool) -> None:
        self.model, self.pool, self.layers = model, pool, layers
        self.device, self.dtype = device, dtype
        self.capture = capture  # False: run the static step eagerly
        self.sizes = buckets(max_rows)
        self.inputs = _Inputs(self.sizes[-1], pool.num_slots, device)
        self.graphs: dict[int, _Graph] = {}
        self.pool_handle = torch.cuda.graph_pool_handle() if capture else None
        self.enabled = True
        self.steps = 0  # static steps run (replays, or eager runs)
        self.captures = 0

    def size(self, cache: BatchCache, slots: list[int]) -> int | None:
        """The padded size of a decode step of ``cache``'s rows over ``slots`` (per row),
        or None where it runs eagerly (a slot of another method, a hot merge, or padding
        rows the slabs' limit would not hold)."""
        rows = cache.rows
        if not self.enabled or not rows or not self.pool.static_ok(slots):
            return None
        at = bisect.bisect_left(self.sizes, rows)
        if at == len(self.sizes):
            return None
        n = self.sizes[at]
        if cache.limit is not None and n * (cache.width + 1) > cache.limit:
            return None  # the padding rows must not grow the slabs past the KV budget
        return n

    def run(self, cache: BatchCache, n: int, tokens: list[int], positions: list[int],
            slots: list[int], at: list[int]) -> torch.Tensor | None:
        """Logits ``[B, V]`` of every running row (slab order) for one decode step padded
        to ``n`` rows: ``tokens``, ``positions``, ``slots`` in packed order, ``at`` slab
        row ``i``'s packed position. None where a capture just failed: the caller runs the
        step eagerly (and every later one: graphs are off)."""
        b = len(tokens)
        cache.reserve(n, cache.width + 1)  # free rows for the padding, room for new keys
        self.inputs.write(n, tokens, positions, slots, at, cache.lengths)
        found = self.graphs.get(n)
        if not self.capture:
            logits: torch.Tensor | None = self._forward(cache, n)
        elif found is None or found.generation != cache.generation:
            logits = self._capture(cache, n)  # replaces the stale one
        else:
            found.graph.replay()
            logits = found.logits
        if logits is None:
            return None
        self.steps += 1
        return logits[:b]

    def _forward(self, cache: BatchCache, n: int) -> torch.Tensor:
        """The static step over the staged inputs: logits ``[n, V]`` in slab order."""
        fields = {name: self.inputs.field(name, n) for name in FIELDS}
        packed = cache.static(n, fields["index"], fields["lengths"], self.layers,
                              self.device, self.dtype)
        with self.pool.use_static(self.inputs.host_field("slots", n), fields["slots"],
                                  self.inputs.groups(n)):
            out = self.model(input_ids=fields["ids"].view(1, n),
                             position_ids=fields["positions"].view(1, n),
                             logits_to_keep=fields["index"], **packed.kwargs())
        return out.logits[0]  # type: ignore[no-any-return]

    def _capture(self, cache: BatchCache, n: int) -> torch.Tensor | None:
        """Capture the step of ``n`` rows (its inputs staged) and replay it; returns its
        logits ``[n, V]``, or None after a failed or differing capture (graphs off)."""
        try:
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up: compile, allocate, pick kernels
                eager = self._forward(cache, n).clone()  # [n, V]
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the load workers may copy adapters to the device meanwhile
            with torch.cuda.graph(graph, pool=self.pool_handle,
                                  capture_error_mode="thread_local"):
                logits = self._forward(cache, n)  # [n, V], the graph's own memory
            graph.replay()
            scale = float(eager.abs().max()) + 1.0
            if not torch.allclose(logits.float(), eager.float(), rtol=0, atol=1e-2 * scale):
                raise RuntimeError("the replayed step differs from the eager one")
        except Exception as exc:
            self.enabled = False
            self.graphs.clear()
            log.warning("CUDA graphs off: decode steps run eagerly",
                        extra={"rows": n, "error": repr(exc)})
            return None
        self.graphs[n] = _Graph(cache.generation, graph, logits)
        self.captures += 1
        log.info("decode step captured", extra={"rows": n, "captures": self.captures})
        return logits
