"""The engine end to end on the built-in model: every output is compared with the
independent reference path (reference_model + a plain greedy loop, tests/server/conftest)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from tessera.adapters import Adapter, AdapterValidationError, Component
from tessera.engine import kvcache
from tessera.engine.attention import DecodePlan, PackedPlan
from tessera.engine.errors import (
    AdapterLoadError,
    ContextLengthError,
    EngineStoppedError,
    RequestValidationError,
)
from tessera.engine.requests import AdapterSpec, GenerationRequest
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import StepReport
from tests.engine.conftest import GREEDY, METHODS, PROMPTS, EngineFactory, Reference, spec


@pytest.mark.parametrize("kernels", ["torch", "triton"])  # Triton: interpreted on a CPU
async def test_mixed_batch_every_method_matches_reference(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        kernels: str) -> None:
    engine = await make_engine(num_slots=8, kernels=kernels)
    # the decode attention follows the pool's kernels (its probe passes here)
    assert (engine.stats().kernels, engine.stats().attention) == (kernels, kernels)
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    threads: set[str] = set()
    engine.base.model.register_forward_pre_hook(
        lambda *_: threads.add(threading.current_thread().name))
    jobs: list[tuple[str, Adapter | None, str]] = [
        (name, adapters[name], PROMPTS[i]) for i, name in enumerate(METHODS)]
    jobs.append(("base", None, PROMPTS[len(METHODS)]))
    handles = [engine.submit(GenerationRequest(
        prompt=prompt, adapter=spec(name, a) if a is not None else None, sampling=GREEDY))
        for name, a, prompt in jobs]  # all submitted before the loop runs: one batch
    results = await asyncio.gather(*(h.result() for h in handles))
    base_out = reference.greedy(None, jobs[-1][2], 8)
    for (name, adapter, prompt), result in zip(jobs, results, strict=True):
        expected = reference.greedy(adapter, prompt, 8)
        assert result.token_ids == expected, name
        assert result.text == reference.text(expected), name
        assert result.finish_reason == "length"
        assert result.prompt_tokens == len(reference.ids(prompt))
    assert base_out == results[-1].token_ids
    # The check has teeth: on each row's prompt, every other adapter (and the base) gives
    # other tokens, so a row run with the wrong slot, or without one, would be caught.
    choices = [None, *adapters.values()]
    for (name, adapter, prompt), result in zip(jobs, results, strict=True):
        others = [reference.greedy(a, prompt, 8) for a in choices if a is not adapter]
        assert result.token_ids not in others, name
    # all eight ran together in decode steps: 7 adapters of 7 kinds + the base
    assert max(r.decode_rows for r in reports) == len(jobs)
    assert max(r.distinct_adapters for r in reports) == len(METHODS)
    assert threads == {"tessera-forward_0"}  # never on the event loop's thread
    stats = engine.stats()
    assert stats.tokens_out == 8 * len(jobs)
    assert stats.slots.loads == len(METHODS) and stats.slots.evictions == 0


async def test_more_adapters_than_slots(make_engine: EngineFactory,
                                        adapters: dict[str, Adapter],
                                        reference: Reference) -> None:
    engine = await make_engine(num_slots=3)
    jobs: list[tuple[str, Adapter | None, str]] = [
        (name, adapters[name], PROMPTS[(i + r) % len(PROMPTS)])
        for r in range(2) for i, name in enumerate(METHODS)]
    jobs += [("base", None, PROMPTS[0])]
    handles = [engine.submit(GenerationRequest(
        prompt=p, adapter=spec(n, a) if a is not None else None, sampling=GREEDY))
        for n, a, p in jobs]
    results = await asyncio.gather(*(h.result() for h in handles))
    for (name, adapter, prompt), result in zip(jobs, results, strict=True):
        assert result.token_ids == reference.greedy(adapter, prompt, 8), name
    stats = engine.stats().slots
    assert stats.evictions >= len(METHODS) - 3
    assert stats.hits + stats.misses == 2 * len(METHODS)
    assert all(engine.slots.pins(name) == 0 for name in METHODS)


async def test_lru_eviction_keeps_recently_used(make_engine: EngineFactory,
                                                adapters: dict[str, Adapter]) -> None:
    engine = await make_engine(num_slots=2)

    async def run(name: str) -> None:
        await engine.submit(GenerationRequest(prompt="hi", adapter=spec(name, adapters[name]),
                                              sampling=GREEDY)).result()

    for name in ("lora", "hra", "lora", "soka"):  # lora was used after hra: hra goes
        await run(name)
    assert set(engine.slots.resident_keys) == {"lora", "soka"}
    stats = engine.stats().slots
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 1)


async def test_failing_loads_fail_only_their_requests(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine()

    async def broken() -> Adapter:
        raise RuntimeError("redis said no")

    lora = adapters["lora"].components[0]
    path, tensors = next(iter(lora.modules.items()))
    poisoned = {**tensors, "lora_A": torch.full_like(tensors["lora_A"], float("nan"))}
    nan_adapter = Adapter((Component("lora", lora.config, {**lora.modules, path: poisoned}),))
    good = [engine.submit(GenerationRequest(prompt=PROMPTS[i], adapter=spec(n, adapters[n]),
                                            sampling=GREEDY))
            for i, n in enumerate(("hut", "dora"))]
    bad_loader = engine.submit(GenerationRequest(prompt="x", adapter=AdapterSpec("b", broken),
                                                 sampling=GREEDY))
    bad_weights = engine.submit(GenerationRequest(prompt="x", adapter=spec("nan", nan_adapter),
                                                  sampling=GREEDY))
    with pytest.raises(AdapterLoadError, match="redis said no") as caught:
        await bad_loader.result()
    assert caught.value.key == "b" and isinstance(caught.value.cause, RuntimeError)
    with pytest.raises(AdapterLoadError) as caught:
        await bad_weights.result()
    assert isinstance(caught.value.cause, AdapterValidationError)
    assert path in str(caught.value)  # names the offending tensor
    for i, (name, handle) in enumerate(zip(("hut", "dora"), good, strict=True)):
        assert (await handle.result()).token_ids == reference.greedy(adapters[name],
                                                                     PROMPTS[i], 8)
    # a failure is not remembered: the same key loads once its loader works
    again = await engine.submit(GenerationRequest(prompt="x", adapter=spec("b", adapters["hra"]),
                                                  sampling=GREEDY)).result()
    assert again.token_ids == reference.greedy(adapters["hra"], "x", 8)
    assert engine.stats().slots.load_failures == 2


async def test_slot_write_out_of_memory_fails_only_that_adapter(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await make_engine()
    pool = engine.slots.pool
    real_write = pool.write

    def write(slot: int, prepared: object) -> None:
        if getattr(prepared, "adapter", None) is adapters["soka"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_write(slot, prepared)  # type: ignore[arg-type]

    monkeypatch.setattr(pool, "write", write)
    doomed = engine.submit(GenerationRequest(prompt="a", adapter=spec("soka", adapters["soka"]),
                                             sampling=GREEDY))
    fine = engine.submit(GenerationRequest(prompt="b", adapter=spec("hra", adapters["hra"]),
                                           sampling=GREEDY))
    with pytest.raises(AdapterLoadError, match="out of memory"):
        await doomed.result()
    assert (await fine.result()).token_ids == reference.greedy(adapters["hra"], "b", 8)
    assert "soka" not in engine.slots.resident_keys
    base = await engine.submit(GenerationRequest(prompt="c", sampling=GREEDY)).result()
    assert base.token_ids == reference.greedy(None, "c", 8)  # still serving


async def test_concurrent_cold_requests_load_once(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine()
    calls: list[str] = []
    handles = [engine.submit(GenerationRequest(prompt=PROMPTS[i],
                                               adapter=spec("hut", adapters["hut"], calls),
                                               sampling=GREEDY)) for i in range(4)]
    results = await asyncio.gather(*(h.result() for h in handles))
    for i, result in enumerate(results):
        assert result.token_ids == reference.greedy(adapters["hut"], PROMPTS[i], 8)
    assert calls == ["hut"]
    assert engine.stats().slots.loads == 1


async def test_over_context_and_bad_requests(make_engine: EngineFactory) -> None:
    engine = await make_engine(context_limit=64, max_tokens_limit=50, default_max_tokens=10)
    prompt = "y" * 29  # + BOS = 30 tokens
    with pytest.raises(ContextLengthError) as caught:
        engine.submit(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=40)))
    message = str(caught.value)
    assert "30" in message and "40" in message and "64" in message
    assert (caught.value.prompt_tokens, caught.value.max_tokens) == (30, 40)
    engine.submit(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=34)))
    with pytest.raises(RequestValidationError, match="max_tokens 51"):
        engine.submit(GenerationRequest(prompt="a", sampling=SamplingParams(max_tokens=51)))
    with pytest.raises(RequestValidationError, match="outside the vocabulary"):
        engine.submit(GenerationRequest(prompt=[1, 10**6]))
    with pytest.raises(RequestValidationError, match="exactly one"):
        engine.submit(GenerationRequest())
    with pytest.raises(RequestValidationError, match="stop sequences"):
        engine.submit(GenerationRequest(prompt="a", sampling=SamplingParams(stop=("",))))


async def test_chat_messages_and_token_prompts(make_engine: EngineFactory,
                                               adapters: dict[str, Adapter],
                                               reference: Reference) -> None:
    engine = await make_engine()
    messages = [{"role": "user", "content": "Hi there"}]
    chat_ids = engine.base.apply_chat_template(messages)
    chat = engine.submit(GenerationRequest(messages=messages, sampling=GREEDY,
                                           adapter=spec("hra", adapters["hra"])))
    raw = engine.submit(GenerationRequest(prompt=[256, 5, 250, 17], sampling=GREEDY))
    assert (await chat.result()).token_ids == reference.greedy(adapters["hra"], chat_ids, 8)
    assert (await raw.result()).token_ids == reference.greedy(None, [256, 5, 250, 17], 8)


async def test_graceful_stop_drains_then_refuses(make_engine: EngineFactory,
                                                 adapters: dict[str, Adapter],
                                                 reference: Reference) -> None:
    engine = await make_engine()
    handles = [engine.submit(GenerationRequest(prompt=PROMPTS[i], sampling=GREEDY,
                                               adapter=spec(n, adapters[n])))
               for i, n in enumerate(("lora", "bottleneck"))]
    await engine.stop(drain_timeout=60)
    for i, (name, handle) in enumerate(zip(("lora", "bottleneck"), handles, strict=True)):
        result = await handle.result()
        assert result.finish_reason == "length"
        assert result.token_ids == reference.greedy(adapters[name], PROMPTS[i], 8)
    with pytest.raises(EngineStoppedError):
        engine.submit(GenerationRequest(prompt="late"))


async def test_stop_times_out_long_requests(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    long = engine.submit(GenerationRequest(prompt="a", sampling=SamplingParams(
        temperature=0, max_tokens=1000, ignore_eos=True)))
    events = long.events()
    first = await anext(events)
    assert first.finish_reason is None
    await engine.stop(drain_timeout=0)
    rest = [e async for e in events]
    assert rest[-1].finish_reason == "shutdown"
    assert rest[-1].completion_tokens < 1000


async def test_chunked_prefill_and_row_limit(make_engine: EngineFactory,
                                             adapters: dict[str, Adapter],
                                             reference: Reference,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts prefilled 3 tokens per chunk, 5 per step, at most 3 rows at once: long
    prompts span many steps while other rows decode; the rest wait for room. Every step is
    ONE forward: the running rows' decode tokens and the chunks (a row's first, or one
    continuing it) packed together."""
    engine = await make_engine(prefill_chunk=3, prefill_tokens_per_step=5, max_batch_rows=3)
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    plans: list[PackedPlan] = []
    real = engine.base.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        plans.append(kwargs["packed_plan"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.base.model, "forward", forward)
    names = ("soka", "bottleneck", "hyperloader", "lora", "dora")
    handles = [engine.submit(GenerationRequest(prompt=PROMPTS[6 - i], sampling=GREEDY,
                                               adapter=spec(n, adapters[n])))
               for i, n in enumerate(names)]
    results = await asyncio.gather(*(h.result() for h in handles))
    for i, (name, result) in enumerate(zip(names, results, strict=True)):
        assert result.token_ids == reference.greedy(adapters[name], PROMPTS[6 - i], 8), name
    assert max(r.prefill_tokens for r in reports) <= 5
    assert max(len(r.adapters) for r in reports) <= 3
    assert any(r.decode_rows and r.prefill_tokens for r in reports)  # interleaved
    assert len(plans) == sum(1 for r in reports if r.decode_rows or r.prefill_tokens)
    assert any(p.decode.numel() and len(p.chunks) == 2 for p in plans)  # + two rows' chunks
    assert any(p.decode.numel() and any(c.mask is not None for c in p.chunks)  # a continued
               for p in plans)  # row


async def test_each_slot_is_one_run_of_the_packed_step(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of LoRA and DoRA decode (slab order: LoRA, DoRA) while a second LoRA row's
    prompt is prefilled in chunks: in every step's packed sequence each adapter slot's
    tokens — its decode rows' and its chunk — are one run (the banks read it as a view),
    and every row equals the reference."""
    engine = await make_engine(prefill_chunk=3)
    pool, slots = engine.scheduler.stepper.pool, []
    use = pool.use

    def routed(ids: torch.Tensor, hot: list[bool] | None = None) -> Any:
        slots.append(ids.reshape(-1).tolist())
        return use(ids, hot=hot)

    monkeypatch.setattr(pool, "use", routed)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    jobs = ((PROMPTS[0], "lora"), (PROMPTS[2], "dora"), (PROMPTS[6], "lora"))
    handles = []
    for prompt, name in jobs:
        handles.append(engine.submit(GenerationRequest(
            prompt=prompt, sampling=params, adapter=spec(name, adapters[name]))))
        while len(handles) < 3 and len(engine.scheduler.stepper.running) < len(handles):
            await asyncio.sleep(0.002)  # decoding before the next one is sent
    for (prompt, name), handle in zip(jobs, handles, strict=True):
        assert (await handle.result()).token_ids == reference.greedy(adapters[name], prompt, 30)
    for ids in slots:
        runs = [s for k, s in enumerate(ids) if k == 0 or ids[k - 1] != s]
        assert len(runs) == len(set(ids)), ids
    assert any(len(ids) > 3 and len(set(ids)) == 2 for ids in slots)  # decode + a chunk


async def test_events_carry_the_models_logprobs(make_engine: EngineFactory,
                                                reference: Reference) -> None:
    """Each token's logprob and its top alternatives come out of the step that chose it,
    equal to a log-softmax of the independent reference model's logits."""
    engine = await make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    handle = engine.submit(GenerationRequest(prompt=PROMPTS[2], sampling=params))
    ids = reference.ids(PROMPTS[2])
    async for event in handle:
        if event.token_id is None:
            continue
        with torch.no_grad():
            logits = reference.base(input_ids=torch.tensor([ids])).logits[0, -1].double()
        logp = logits - torch.logsumexp(logits, dim=-1)  # [V]
        assert event.token_id == int(logp.argmax())
        assert event.logprob == pytest.approx(float(logp[event.token_id]), abs=1e-4)
        want = torch.topk(logp, 3)
        assert [t for t, _ in event.top_logprobs] == want.indices.tolist()
        assert [v for _, v in event.top_logprobs] == pytest.approx(want.values.tolist(),
                                                                   abs=1e-4)
        ids.append(event.token_id)


@pytest.mark.parametrize("kernels", ["torch", "triton"])  # Triton: interpreted on a CPU
async def test_a_long_row_beside_short_rows_joining_and_leaving(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference,
        monkeypatch: pytest.MonkeyPatch, kernels: str) -> None:
    """A 1,000-token row beside 10-token rows that join and leave on different steps:
    every row equals the reference; the slab grows as needed; the decode attention ran
    grouped by length (the short rows did not attend over the long row's width), or on the
    Triton kernel, each row over its own length with no plan at all."""
    plans: list[DecodePlan | None] = []
    real = kvcache.plan

    def spy(*args: Any, **kwargs: Any) -> DecodePlan | None:
        plans.append(found := real(*args, **kwargs))
        return found

    monkeypatch.setattr(kvcache, "plan", spy)
    engine = await make_engine(prefill_chunk=256, kernels=kernels)
    assert engine.stats().attention == kernels
    gen = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(3, 200, (1000,), generator=gen).tolist()
    jobs: list[tuple[list[int], int, str | None]] = [(long_prompt, 12, None)]
    jobs += [(torch.randint(3, 200, (10,), generator=gen).tolist(), n, name)
             for n, name in ((3, "lora"), (7, None), (5, "dora"), (9, "hra"))]
    handles = []
    for i, (prompt, n, name) in enumerate(jobs):
        handles.append(engine.submit(GenerationRequest(
            prompt=prompt, adapter=spec(name, adapters[name]) if name else None,
            sampling=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))))
        if i % 2:  # later rows join while earlier ones run (and some have left)
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*(h.result() for h in handles))
    for (prompt, n, name), result in zip(jobs, results, strict=True):
        assert result.token_ids == reference.greedy(adapters[name] if name else None,
                                                    prompt, n), (len(prompt), name)
    if kernels == "torch":
        assert any(p is not None and len(p.groups) > 1 for p in plans)
    else:
        assert not plans
