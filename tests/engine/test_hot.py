"""Hot tenants (tessera.engine.hot, dLoRA in the one forward): hot rows and every other row
of the same forward against the independent reference, the base left bit-identical, the
policy, pins, and the switch between steps."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tessera.adapters import Adapter, NotMergeableError
from tessera.engine.core import Engine
from tessera.engine.requests import GenerationRequest
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import StepReport
from tests.engine.conftest import GREEDY, PROMPTS, EngineFactory, Reference, spec

MERGEABLE = ("lora", "hra")  # low-rank only
OTHERS = ("dora", "hut", "soka", "bottleneck", "hyperloader")
POLICY = {"hot_merge": True, "hot_window_s": 10.0, "hot_enter_share": 0.6,
          "hot_leave_share": 0.3, "hot_min_tokens": 16, "hot_interval_s": 3600.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def run(engine: Engine, jobs: list[tuple[str, Adapter | None, str]],
              sampling: SamplingParams = GREEDY) -> list[list[int]]:
    handles = [engine.submit(GenerationRequest(
        prompt=prompt, adapter=spec(key, a) if a is not None else None, sampling=sampling))
        for key, a, prompt in jobs]  # all submitted before the loop runs: one batch
    return [r.token_ids for r in await asyncio.gather(*(h.result() for h in handles))]


async def test_hot_and_other_rows_share_one_forward_and_match_the_reference(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    for hot_name in MERGEABLE:
        engine = await make_engine(num_slots=8, hot_merge=False)  # pins only
        await engine.pin(spec(hot_name, adapters[hot_name]))
        assert engine.stats().hot.merged == (hot_name,)  # type: ignore[union-attr]
        reports: list[StepReport] = []
        engine.subscribe(reports.append)
        # the hot adapter on two prompts, the same weights under another key (slot pool),
        # every other method and the base: one batch
        jobs: list[tuple[str, Adapter | None, str]] = [
            (hot_name, adapters[hot_name], PROMPTS[0]), (hot_name, adapters[hot_name], PROMPTS[1]),
            (f"{hot_name}-cold", adapters[hot_name], PROMPTS[0])]
        jobs += [(n, adapters[n], PROMPTS[2 + i]) for i, n in enumerate(OTHERS)]
        jobs.append(("base", None, PROMPTS[7]))
        results = await run(engine, jobs)
        for (key, adapter, prompt), tokens in zip(jobs, results, strict=True):
            assert tokens == reference.greedy(adapter, prompt, 8), (hot_name, key)
        decode = max(reports, key=lambda r: r.decode_rows)
        assert decode.decode_rows == len(jobs) and decode.merged_rows == 2  # one forward
        for key, merged in zip(decode.adapters, decode.merged, strict=True):
            assert merged == (key == hot_name), key
        assert engine.slots.slot_of(hot_name) is None  # hot rows hold no slot
        hot = engine.stats().hot
        assert hot is not None and hot.merged_tokens_total == 16
        assert hot.merged_share == pytest.approx(2 / len(jobs))


async def test_base_parameters_bit_identical(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(hot_merge=False)
    model = engine.base.model
    before = {n: (t.detach().clone(), t.data_ptr())
              for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for i, name in enumerate(MERGEABLE):
        await engine.pin(spec(name, adapters[name]))  # replaces the previous pin
        [tokens] = await run(engine, [(name, adapters[name], PROMPTS[i])])
        assert tokens == reference.greedy(adapters[name], PROMPTS[i], 8)
    assert engine.unpin(MERGEABLE[-1]) and not engine.unpin(MERGEABLE[0])
    engine.hot.evaluate()
    assert not engine.stats().hot.merged  # type: ignore[union-attr]
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys()
    for n, (saved, ptr) in before.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], saved), n


async def test_policy_merges_hot_adapter_and_drops_it_when_cold(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    clock = Clock()
    engine.hot.clock = clock
    lora, hra = adapters["lora"], adapters["hra"]
    await run(engine, [("lora", lora, PROMPTS[i]) for i in range(3)]
              + [("hra", hra, PROMPTS[3])])  # lora carries 24 of 32 tokens
    assert engine.hot.shares()["lora"] == pytest.approx(0.75)
    engine.hot.evaluate()
    await engine.hot.settle()
    assert engine.is_merged("lora") and not engine.is_merged("hra")  # one at a time
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    [tokens] = await run(engine, [("lora", lora, PROMPTS[4])])
    assert tokens == reference.greedy(lora, PROMPTS[4], 8)
    assert all(r.merged == (True,) for r in reports)
    # cooler but above the leave share: stays merged (hysteresis)
    await run(engine, [("hra", hra, PROMPTS[i]) for i in range(4)])  # lora 32 of 72
    assert 0.3 <= engine.hot.shares()["lora"] < 0.6
    engine.hot.evaluate()
    assert engine.is_merged("lora")
    # traffic stops: once its tokens leave the window, the merge is dropped
    clock.now += 11.0
    engine.hot.evaluate()
    await engine.hot.settle()
    stats = engine.stats().hot
    assert stats is not None and stats.merged == () and stats.drops == 1
    assert stats.window_tokens == 0 and stats.builds == 1
    [tokens] = await run(engine, [("lora", lora, PROMPTS[5])])  # back on the slot pool
    assert tokens == reference.greedy(lora, PROMPTS[5], 8)
    assert engine.scheduler.stepper.hot_key is None  # uninstalled between steps


async def test_pin_keeps_adapter_merged_regardless_of_traffic(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    clock = Clock()
    engine.hot.clock = clock
    await engine.pin(spec("hra", adapters["hra"]))
    await run(engine, [("lora", adapters["lora"], PROMPTS[i]) for i in range(3)])
    for _ in range(2):  # another adapter carries all the traffic, then none at all
        engine.hot.evaluate()
        await engine.hot.settle()
        assert engine.is_merged("hra") and not engine.is_merged("lora")
        clock.now += 100.0
    [tokens] = await run(engine, [("hra", adapters["hra"], PROMPTS[0])])
    assert tokens == reference.greedy(adapters["hra"], PROMPTS[0], 8)
    engine.hot.evaluate()
    assert engine.is_merged("hra")  # its own recent tokens (share 1.0) would keep it too
    assert engine.unpin("hra") and not engine.unpin("hra")
    clock.now += 100.0
    engine.hot.evaluate()
    assert not engine.is_merged("hra")


async def test_non_low_rank_adapter_is_never_merged(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    engine.hot.clock = Clock()
    for name in OTHERS:
        jobs: list[tuple[str, Adapter | None, str]] = [
            (name, adapters[name], PROMPTS[i]) for i in range(3)]
        results = await run(engine, jobs)
        for (_, adapter, prompt), tokens in zip(jobs, results, strict=True):
            assert tokens == reference.greedy(adapter, prompt, 8)
        assert engine.hot.shares()[name] >= 0.6
        engine.hot.evaluate()
        await engine.hot.settle()
        assert not engine.is_merged(name)
        with pytest.raises(NotMergeableError):
            await engine.pin(spec(name, adapters[name]))
        assert not engine.is_merged(name)
        engine.hot.clock.now += 100.0  # type: ignore[attr-defined]
    stats = engine.stats().hot
    assert stats is not None and stats.ineligible == len(OTHERS) and stats.builds == 0
    assert stats.pinned == ()


async def test_hot_rows_finish_on_the_merge_after_it_is_dropped(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    """A dropped merge stays installed until its hot rows end; new rows of the adapter go
    to a slot meanwhile, and the next merge waits its turn."""
    engine = await make_engine(hot_merge=False)
    lora, hra = adapters["lora"], adapters["hra"]
    await engine.pin(spec("lora", lora))
    long = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    merged = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter=spec("lora", lora),
                                             sampling=long))
    events = merged.events()
    first = await anext(events)  # the row runs on the merge now
    await engine.pin(spec("hra", hra))  # replaces the pin: the hra merge is wanted next
    assert engine.is_merged("hra") and not engine.is_merged("lora")
    cold = engine.submit(GenerationRequest(prompt=PROMPTS[1], adapter=spec("lora", lora),
                                           sampling=GREEDY))
    waiting = engine.submit(GenerationRequest(prompt=PROMPTS[2], adapter=spec("hra", hra),
                                              sampling=GREEDY))
    assert (await cold.result()).token_ids == reference.greedy(lora, PROMPTS[1], 8)
    assert engine.scheduler.stepper.hot_key == "lora"  # its hot row still runs
    assert (await waiting.result()).token_ids == reference.greedy(hra, PROMPTS[2], 8)
    rest = [e.token_id async for e in events]
    assert [first.token_id, *rest] == reference.greedy(lora, PROMPTS[0], 24)
    [tokens] = await run(engine, [("hra", hra, PROMPTS[3])])
    assert tokens == reference.greedy(hra, PROMPTS[3], 8)
    assert engine.scheduler.stepper.hot_key == "hra"  # installed once lora's row ended


async def test_policy_runs_on_its_own_timer(make_engine: EngineFactory,
                                            adapters: dict[str, Adapter]) -> None:
    """No manual evaluate and the real clock: the engine's periodic check merges the hot
    adapter, then drops it once its tokens leave the window."""
    engine = await make_engine(**{**POLICY, "hot_window_s": 2.0, "hot_interval_s": 0.02})
    await run(engine, [("lora", adapters["lora"], PROMPTS[i]) for i in range(3)])

    async def until(condition: bool) -> None:
        for _ in range(500):
            if engine.is_merged("lora") == condition:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"is_merged never became {condition}")

    await until(True)
    await until(False)
