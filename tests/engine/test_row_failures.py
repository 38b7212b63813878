"""A failure that belongs to one row fails that row only: its sampling values, its adapter's
non-finite output, its detokenization. A failed decode forward is retried once; if it
keeps failing only the rows of that forward fail, and the engine keeps serving. Every
surviving row equals the independent reference."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tessera.adapters import Adapter, Component
from tessera.engine.errors import RowError, StepError
from tessera.engine.requests import GenerationRequest, RequestHandle
from tessera.engine.sampling import NonFiniteLogitsError, SamplingParams
from tests.engine.conftest import GREEDY, PROMPTS, EngineFactory, Reference, spec


def overflowing(adapter: Adapter) -> Adapter:
    """``adapter``'s LoRA with finite weights so large that its output overflows to inf
    (finite, so it passes validation; the damage shows only in the forward)."""
    lora = adapter.components[0]
    modules = {path: {name: torch.full_like(t, 1e19) for name, t in tensors.items()}
               for path, tensors in lora.modules.items()}
    return Adapter((Component("lora", lora.config, modules),))


async def test_poison_rows_fail_alone(make_engine: EngineFactory,
                                      adapters: dict[str, Adapter],
                                      reference: Reference) -> None:
    engine = await make_engine()
    poison = {
        "tiny temperature": SamplingParams(temperature=1e-40, max_tokens=8, seed=1),
        "denormal top_p": SamplingParams(top_p=5e-324, max_tokens=8, seed=2),
    }
    good = [engine.submit(GenerationRequest(prompt=PROMPTS[i], sampling=GREEDY,
                                            adapter=spec(n, adapters[n]) if n else None))
            for i, n in enumerate(("lora", None, "hra", None))]
    odd = {name: engine.submit(GenerationRequest(prompt=PROMPTS[5], sampling=params))
           for name, params in poison.items()}
    broken = engine.submit(GenerationRequest(
        prompt=PROMPTS[6], sampling=GREEDY,
        adapter=spec("overflow", overflowing(adapters["lora"]))))
    with pytest.raises(NonFiniteLogitsError):
        await broken.result()
    for name, handle in odd.items():  # both collapse to the top token: greedy
        assert (await handle.result()).token_ids == reference.greedy(None, PROMPTS[5], 8), name
    for i, (n, handle) in enumerate(zip(("lora", None, "hra", None), good, strict=True)):
        want = reference.greedy(adapters[n] if n else None, PROMPTS[i], 8)
        assert (await handle.result()).token_ids == want
    assert engine.stats().finished.get("error") == 1


def row_of(engine: Any, handle: RequestHandle) -> Any:
    return next(r for r in engine.scheduler.waiting if r.handle is handle)


async def test_a_detokenizer_failure_mid_stream_fails_that_row(
        make_engine: EngineFactory, reference: Reference) -> None:
    """Fault injection: one row's text stream raises on its third token (decode stage,
    inside a batch that keeps running)."""
    engine = await make_engine()
    others = [engine.submit(GenerationRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS[:3]]
    victim = engine.submit(GenerationRequest(prompt=PROMPTS[3], sampling=GREEDY))
    stream = row_of(engine, victim).stream
    real, calls = stream._decode, [0]

    def decode(ids: Any) -> str:
        calls[0] += 1
        if len(stream.ids) - stream._generated_start >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return str(real(ids))

    stream._decode = decode
    got: list[int] = []
    with pytest.raises(RowError, match="injected"):
        async for event in victim:
            if event.token_id is not None:
                got.append(event.token_id)
    assert got == reference.greedy(None, PROMPTS[3], 2)  # two tokens went out first
    for prompt, handle in zip(PROMPTS[:3], others, strict=True):
        assert (await handle.result()).token_ids == reference.greedy(None, prompt, 8)


def fail_decodes(monkeypatch: pytest.MonkeyPatch, model: Any, message: str,
                 fail: Callable[[], bool]) -> list[int]:
    """Fault injection: forwards that carry decode tokens (the packed plan's first part)
    raise ``message`` while ``fail()`` says so; returns the running count of injected
    failures."""
    real, count = model.forward, [0]

    def forward(*args: Any, **kwargs: Any) -> Any:
        plan = kwargs.get("packed_plan")
        if plan is not None and plan.decode.numel() and fail():
            count[0] += 1
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return count


async def test_a_failed_decode_forward_is_retried_once(
        make_engine: EngineFactory, reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await make_engine()
    failures = fail_decodes(monkeypatch, engine.base.model, "CUDA out of memory (injected)",
                            lambda: failures[0] == 0)  # the first decode only
    handles = [engine.submit(GenerationRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS[:3]]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert failures[0] == 1
    for prompt, result in zip(PROMPTS[:3], results, strict=True):
        assert result.token_ids == reference.greedy(None, prompt, 8)


async def test_a_decode_forward_that_keeps_failing_fails_its_rows_only(
        make_engine: EngineFactory, reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await make_engine()
    broken = [True]
    fail_decodes(monkeypatch, engine.base.model, "device lost (injected)", lambda: broken[0])
    handles = [engine.submit(GenerationRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS[:2]]
    for handle in handles:
        with pytest.raises(StepError, match="device lost"):
            await handle.result()
    broken[0] = False  # the engine is still up: the next request runs normally
    after = await engine.submit(GenerationRequest(prompt=PROMPTS[4], sampling=GREEDY)).result()
    assert after.token_ids == reference.greedy(None, PROMPTS[4], 8)


async def test_joining_rows_prefill_in_one_forward_or_alone_if_it_fails(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows joining together prefill in ONE forward (different lengths and adapters, packed
    one after the other, no padding); when that forward fails they are prefilled one by
    one, each still correct."""
    names = ("lora", None, "soka", "bottleneck")
    for broken in (False, True):
        engine = await make_engine()
        await asyncio.gather(*(engine.submit(GenerationRequest(  # adapters resident first
            prompt="x", sampling=GREEDY, adapter=spec(n, adapters[n]))).result()
            for n in names if n))
        model = engine.base.model
        real, chunks = model.forward, []

        def forward(*args: Any, broken: bool = broken, real: Any = real,
                    chunks: list[int] = chunks, **kwargs: Any) -> Any:
            chunks.append(len(kwargs["packed_plan"].chunks))
            if broken and chunks[-1] > 1:  # the rows' prefill together
                raise RuntimeError("out of memory (injected)")
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)
        handles = [engine.submit(GenerationRequest(
            prompt=PROMPTS[i], sampling=GREEDY,
            adapter=spec(n, adapters[n]) if n else None)) for i, n in enumerate(names)]
        results = await asyncio.gather(*(h.result() for h in handles))
        for i, (n, result) in enumerate(zip(names, results, strict=True)):
            assert result.token_ids == reference.greedy(adapters[n] if n else None,
                                                        PROMPTS[i], 8), (broken, n)
        prefills = [n for n in chunks if n]
        if broken:  # the failed step, then one forward per row
            assert prefills == [4, 1, 1, 1, 1]
        else:
            assert prefills == [4]


async def test_a_row_that_cannot_join_the_batch_cache_fails_alone(
        make_engine: EngineFactory, reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: copying one prefilled row into the batch KV cache raises (no memory
    for the slab) after the step's forward succeeded: that row fails, the rows of the same
    step keep their tokens and equal the reference, none runs twice."""
    engine = await make_engine()
    cache = engine.scheduler.stepper.main.cache
    real, lengths = cache.add, [len(reference.ids(p)) for p in PROMPTS[:3]]

    def add(row: Any, length: int) -> None:
        if length == lengths[1]:
            raise RuntimeError("out of memory (injected)")
        real(row, length)

    monkeypatch.setattr(cache, "add", add)
    handles = [engine.submit(GenerationRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS[:3]]
    with pytest.raises(RowError, match="injected"):
        await handles[1].result()
    for i in (0, 2):
        assert (await handles[i].result()).token_ids == reference.greedy(None, PROMPTS[i], 8)
