"""Continuous batching behaviour: joining mid-run, cancellation, the bounded queue, stop
sequences, seeded sampling; plus the detokenizer and sampling filters on their own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch

from tessera.adapters import Adapter
from tessera.engine.detok import TextStream
from tessera.engine.errors import QueueFullError
from tessera.engine.requests import AdapterSpec, GenerationRequest, TokenEvent
from tessera.engine.sampling import SamplingParams, filtered_probs
from tessera.engine.scheduler import StepReport
from tests.engine.conftest import GREEDY, PROMPTS, EngineFactory, Reference, spec


async def test_requests_joining_mid_run_match_running_alone(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine()
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = engine.submit(GenerationRequest(prompt=PROMPTS[2], sampling=long,
                                            adapter=spec("dora", adapters["dora"])))
    events = first.events()
    seen = [await anext(events) for _ in range(5)]
    late = [engine.submit(GenerationRequest(prompt=PROMPTS[3 + i], sampling=GREEDY,
                                            adapter=spec(n, adapters[n])))
            for i, n in enumerate(("soka", "hyperloader"))]
    late.append(engine.submit(GenerationRequest(prompt=PROMPTS[6], sampling=GREEDY)))
    rest = [e async for e in events]
    results = [await h.result() for h in late]
    tokens = [e.token_id for e in [*seen, *rest]]
    assert tokens == reference.greedy(adapters["dora"], PROMPTS[2], 24)
    for i, name in enumerate(("soka", "hyperloader")):
        assert results[i].token_ids == reference.greedy(adapters[name], PROMPTS[3 + i], 8)
    assert results[2].token_ids == reference.greedy(None, PROMPTS[6], 8)
    # they really shared forwards with the running row
    together = [r for r in reports
                if first.request_id in r.request_ids and late[0].request_id in r.request_ids]
    assert len(together) >= 7


async def test_cancel_leaves_the_batch_within_one_step(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine()
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    endless = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    doomed = engine.submit(GenerationRequest(prompt="a", sampling=endless,
                                             adapter=spec("hut", adapters["hut"])))
    other = engine.submit(GenerationRequest(prompt="b", sampling=GREEDY,
                                            adapter=spec("hut", adapters["hut"])))
    events = doomed.events()
    for _ in range(3):
        await anext(events)
    cutoff = engine.scheduler.stats.steps  # steps started so far, the one in flight included
    doomed.cancel()
    rest = [e async for e in events]
    assert rest[-1].finish_reason == "cancelled"
    assert (await other.result()).token_ids == reference.greedy(adapters["hut"], "b", 8)
    after = [r for r in reports if r.index >= cutoff]
    assert after and all(doomed.request_id not in r.request_ids for r in after)
    assert engine.slots.pins("hut") == 0
    assert engine.stats().running_rows == 0


async def test_breaking_out_of_the_stream_cancels(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    handle = engine.submit(GenerationRequest(prompt="a", sampling=SamplingParams(
        temperature=0, max_tokens=500, ignore_eos=True)))
    async with handle:
        async for _ in handle:
            break  # the client went away
    assert handle.cancelled
    closed = engine.submit(GenerationRequest(prompt="b", sampling=SamplingParams(
        temperature=0, max_tokens=500, ignore_eos=True)))
    events = closed.events()
    await anext(events)
    await events.aclose()  # what a streaming response does when its client disconnects
    assert closed.cancelled
    while engine.stats().running_rows or engine.stats().prefilling_rows:
        await asyncio.sleep(0.01)
    assert engine.stats().finished.get("cancelled") == 2


async def test_queue_full_raises_with_retry_after(make_engine: EngineFactory,
                                                  adapters: dict[str, Adapter],
                                                  reference: Reference) -> None:
    engine = await make_engine(max_queue=2)
    release = asyncio.Event()

    async def slow() -> Adapter:
        await release.wait()
        return adapters["lora"]

    waiting = [engine.submit(GenerationRequest(prompt="q", sampling=GREEDY,
                                               adapter=AdapterSpec("slow", slow)))
               for _ in range(2)]
    with pytest.raises(QueueFullError) as caught:
        engine.submit(GenerationRequest(prompt="q", sampling=GREEDY))
    assert caught.value.retry_after_s >= 1 and caught.value.queue_depth == 2
    release.set()
    for handle in waiting:
        assert (await handle.result()).token_ids == reference.greedy(adapters["lora"], "q", 8)
    engine.submit(GenerationRequest(prompt="q", sampling=GREEDY))  # room again


async def test_stop_sequences_cut_the_text(make_engine: EngineFactory,
                                           adapters: dict[str, Adapter],
                                           reference: Reference) -> None:
    engine = await make_engine()
    adapter = adapters["hra"]

    def usable(text: str) -> int | None:
        """Where a two-character stop can start: after some text, first occurrence, no
        replacement character (two or more byte tokens long)."""
        for i in range(1, len(text) - 1):
            if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i:
                return i
        return None

    candidates = [(p, reference.greedy(adapter, p, 8)) for p in PROMPTS]
    prompt, full, start = next((p, ids, i) for p, ids in candidates
                               if (i := usable(reference.text(ids))) is not None)
    text = reference.text(full)
    stop = text[start:start + 2]
    handle = engine.submit(GenerationRequest(
        prompt=prompt, adapter=spec("hra", adapter),
        sampling=SamplingParams(temperature=0, max_tokens=8, stop=("never-seen", stop))))
    events = [e async for e in handle]
    streamed = "".join(e.text for e in events)
    assert streamed == text[:start]
    assert events[-1].finish_reason == "stop"
    ids = [e.token_id for e in events]
    assert ids == full[:len(ids)]  # it stopped at the token completing the stop


async def test_seeded_sampling_is_reproducible(make_engine: EngineFactory,
                                               adapters: dict[str, Adapter],
                                               reference: Reference) -> None:
    engine = await make_engine()

    def sampled(seed: int, **extra: float) -> GenerationRequest:
        return GenerationRequest(prompt="seed", adapter=spec("lora", adapters["lora"]),
                                 sampling=SamplingParams(temperature=1.0, max_tokens=16,
                                                         seed=seed, ignore_eos=True, **extra))

    alone = await engine.submit(sampled(1)).result()
    crowd = [engine.submit(GenerationRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS[:4]]
    together = engine.submit(sampled(1))
    other = engine.submit(sampled(2))
    assert (await together.result()).token_ids == alone.token_ids
    assert (await other.result()).token_ids != alone.token_ids
    await asyncio.gather(*(h.result() for h in crowd))
    # top_k = 1 and a tiny nucleus leave only the argmax: the greedy reference
    greedy = reference.greedy(adapters["lora"], "seed", 16)
    assert (await engine.submit(sampled(3, top_k=1)).result()).token_ids == greedy
    assert (await engine.submit(sampled(4, top_p=1e-6)).result()).token_ids == greedy


# --- pieces on their own -------------------------------------------------------------------
def utf8(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def stream_all(stream: TextStream, data: bytes) -> tuple[list[str], str]:
    deltas = [stream.push(b) for b in data]
    return deltas, "".join(deltas) + stream.flush()


def test_text_stream_waits_for_whole_characters() -> None:
    data = "a世🙂b".encode()
    deltas, text = stream_all(TextStream(utf8), data)
    assert text == "a世🙂b"
    assert "\ufffd" not in "".join(deltas)
    assert deltas[:4] == ["a", "", "", "世"]


def test_text_stream_holds_back_possible_stop_starts() -> None:
    stream = TextStream(utf8, stop=["STOP"])
    deltas, _ = stream_all(stream, b"xxSTxSTOPyy")
    assert deltas[:3] == ["x", "x", ""] and deltas[4] == "STx"
    assert stream.stopped and stream.text == "xxSTx"
    assert "".join(deltas) == "xxSTx"


def test_text_stream_applies_stops_from_min_tokens_on() -> None:
    """A stop string ending before the ``min_tokens``-th token is ordinary text (vLLM)."""
    stream = TextStream(utf8, stop=["ST"], min_tokens=4)
    deltas, _ = stream_all(stream, b"aSTbSTc")
    assert stream.stopped and stream.text == "aSTb"  # the first "ST" ended at token 3
    assert "".join(deltas) == "aSTb"
    early = TextStream(utf8, stop=["ST"], min_tokens=3)
    stream_all(early, b"aSTbSTc")
    assert early.text == "a"  # the first "ST" ends at token 3: it counts


def test_text_stream_without_stop_flushes_incomplete_bytes() -> None:
    deltas, text = stream_all(TextStream(utf8), b"ok\xe4\xb8")
    assert "".join(deltas) == "ok" and text == "ok\ufffd"


def test_filtered_probs() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    top2 = filtered_probs(logits, SamplingParams(top_k=2))
    assert torch.count_nonzero(top2) == 2 and top2[:2].sum() == pytest.approx(1.0)
    p = torch.softmax(logits, -1)
    nucleus = filtered_probs(logits, SamplingParams(top_p=float(p[0] + p[1] / 2)))
    assert torch.count_nonzero(nucleus) == 2  # the smallest prefix reaching top_p
    cold = filtered_probs(logits, SamplingParams(temperature=0.01))
    assert cold[0] == pytest.approx(1.0)


def test_event_defaults() -> None:
    assert TokenEvent(token_id=1, text="a").finish_reason is None
