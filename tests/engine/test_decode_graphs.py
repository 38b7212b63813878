"""Static decode steps (``tessera.engine.graphs``): the decode step a CUDA graph captures
once per padded size and replays. On a CPU they run uncaptured (``decode_graphs="eager"``,
the Triton kernels in their interpreter); where ``scripts/device-check`` runs the engine
tests on CUDA they are captured and replayed too. Every row's tokens equal the independent
reference's; and two steps of one padded size run the same operations on the same
buffers (what makes a replay of one capture right for the other)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tessera.adapters import Adapter
from tessera.engine.graphs import buckets
from tessera.engine.kvcache import BatchCache
from tessera.engine.requests import GenerationRequest
from tessera.engine.sampling import SamplingParams
from tests.engine.conftest import DEVICE, PROMPTS, EngineFactory, Reference, spec

MODES = ["eager", "auto"] if DEVICE == "cuda" else ["eager"]  # auto: captured, CUDA only


@pytest.mark.parametrize("mode", MODES)
async def test_static_decode_steps_match_the_reference(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        mode: str) -> None:
    """LoRA, DoRA, HRA and base rows of different lengths leave on different steps (the
    padded size changes: 5 rows -> 8, then 4, 2, 1) and a late row joins; a HUT row (no
    static form) makes the steps it runs in eager, the others run static."""
    engine = await make_engine(num_slots=5, kernels="triton", decode_graphs=mode)
    jobs: list[tuple[str | None, str, int]] = [  # DoRA first: slot 0
        ("dora", PROMPTS[6], 4), ("lora", PROMPTS[0], 9), ("hra", PROMPTS[2], 5),
        (None, PROMPTS[4], 7), ("hut", PROMPTS[1], 2)]

    def submit(name: str | None, prompt: str, n: int) -> asyncio.Task[list[int]]:
        handle = engine.submit(GenerationRequest(
            prompt=prompt, adapter=spec(name, adapters[name]) if name else None,
            sampling=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))

        async def tokens() -> list[int]:
            return (await handle.result()).token_ids

        return asyncio.ensure_future(tokens())

    tasks = [submit(*job) for job in jobs]
    await asyncio.sleep(0.3)
    late = ("hra", PROMPTS[7], 6)
    tasks.append(submit(*late))
    results = await asyncio.gather(*tasks)
    for (name, prompt, n), got in zip([*jobs, late], results, strict=True):
        assert got == reference.greedy(adapters[name] if name else None, prompt, n), name
    stats = engine.stats()
    assert stats.graph_steps >= 5  # most decode steps ran static
    assert stats.graph_steps < stats.steps  # prefill and the HUT row's steps did not
    if mode == "auto":
        assert stats.graph_captures >= 3  # sizes 8, 4, 2, 1 (and again after slab growth)


Op = tuple[str, tuple[object, ...]]


class Trace(TorchDispatchMode):
    """Every aten op of a forward with what it reads: each tensor's shape, strides and
    dtype, and its storage's address unless an earlier op of the same forward made it (a
    graph's own memory); every other argument as is. A CUDA graph replays exactly such a
    sequence on exactly those addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.made: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        read: list[object] = []
        for a in pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and a.is_mkldnn:  # a packed weight: no storage
                read.append(("mkldnn", id(a)))
            elif isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr()
                read.append((tuple(a.shape), a.stride(), a.dtype, a.storage_offset(),
                             "made" if ptr in self.made else ptr))
            elif isinstance(a, torch.UntypedStorage):  # set_ onto a storage
                ptr = a.data_ptr()
                read.append(("storage", "made" if ptr in self.made else ptr))
            else:
                read.append(repr(a))
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and not o.is_mkldnn:
                self.made.add(o.untyped_storage().data_ptr())
        self.ops.append((str(func), tuple(read)))
        return out


async def test_steps_of_one_size_run_the_same_ops_on_the_same_buffers(
        make_engine: EngineFactory, adapters: dict[str, Adapter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Static steps of one padded size with other tokens, positions, lengths and slots
    (a row leaves: 4 rows, then 3, both padded to 4) trace the same aten ops with the same
    shapes on the same external buffers, and build nothing from host data (no
    ``torch.tensor`` inside the forward): the step's inputs all come from the staged
    buffers, so one capture replays every step of its size."""
    engine = await make_engine(num_slots=4, kernels="triton", decode_graphs="eager")
    graphs = engine.scheduler.stepper.graphs
    assert graphs is not None
    traces: dict[tuple[int, int], list[tuple[int, list[Op]]]] = {}  # (slabs, size) ->
    real = graphs._forward  # (rows, ops) per step

    def traced(cache: Any, n: int) -> torch.Tensor:
        with Trace() as trace:
            out = real(cache, n)
        traces.setdefault((cache.generation, n), []).append((cache.rows, trace.ops))
        return out

    monkeypatch.setattr(graphs, "_forward", traced)
    jobs = [("lora", PROMPTS[0], 8), ("dora", PROMPTS[2], 8), (None, PROMPTS[4], 8),
            ("hra", PROMPTS[6], 3)]
    await asyncio.gather(*(engine.submit(GenerationRequest(
        prompt=prompt, adapter=spec(name, adapters[name]) if name else None,
        sampling=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))).result()
        for name, prompt, n in jobs))
    same = max(traces.values(), key=len)  # the steps of one size on one slab
    assert {rows for rows, _ in same} == {3, 4}  # 4 rows, then 3, both padded to 4
    first = same[0][1]
    for _, ops in same[1:]:
        assert ops == first
    assert not any(name.startswith("aten.lift_fresh") for name, _ in first)


async def test_the_padded_size(make_engine: EngineFactory) -> None:
    """Steps pad up to the next bucket, never past the largest batch or the slabs' limit;
    other steps run eagerly."""
    assert buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40] and buckets(1) == [1]
    engine = await make_engine(kernels="triton", decode_graphs="eager", max_batch_rows=40)
    graphs = engine.scheduler.stepper.graphs
    assert graphs is not None
    kv = (torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4))  # [1, H, 9, D]
    for limit, want in ((None, 4), (40, 4), (39, None)):  # 4 rows x (9 + 1) positions
        cache = BatchCache(limit=limit)
        for _ in range(3):
            cache.add([kv], 9)
        assert graphs.size(cache, [-1, -1, -1]) == want, limit
    cache = BatchCache()
    for _ in range(33):
        cache.add([kv], 9)
    assert graphs.size(cache, [-1] * 33) == 40
    assert graphs.size(BatchCache(), []) is None  # no rows
    for _ in range(8):
        cache.add([kv], 9)
    assert graphs.size(cache, [-1] * 41) is None  # past the largest batch
