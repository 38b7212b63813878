"""tessera.server.metrics: the scrape text after driving a real engine and synthetic events; label
cardinality stays bounded however many tenants there are."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tessera.adapters import Adapter
from tessera.engine.core import Engine
from tessera.engine.requests import GenerationRequest
from tessera.engine.scheduler import StepReport
from tessera.server.metrics import Metrics, MetricsSettings, TenantLabels, method_label
from tessera.store.cache import HostCache
from tessera.store.embedded import EmbeddedStats
from tests.engine.conftest import GREEDY, EngineFactory, HermeticSettings, spec

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> tuple[set[str], Samples]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families, samples = set(), {}
    for family in text_string_to_metric_families(body.decode()):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, sorted(k for k in samples if k[0] == name)
    return samples[key]


async def test_engine_state_and_step_series(make_engine: EngineFactory,
                                            adapters: dict[str, Adapter]) -> None:
    engine = await make_engine(num_slots=1)
    metrics = Metrics(CollectorRegistry(), MetricsSettings(tenant_allowlist=["acme"]))
    metrics.attach(engine)
    await engine.pin(spec("hra", adapters["hra"]))  # served from merged weights, no slot
    cache: HostCache[str, bytes] = HostCache(10, len)
    cache.put("a", b"12345678")
    cache.get("a")
    cache.get("b")
    cache.put("c", b"1234")  # evicts "a"
    metrics.bind_host_cache(cache.stats)

    # lora and soka through one slot, hra merged, concurrently: one forward holds several
    names = ("lora", "hra", "soka", "lora")
    handles = [engine.submit(GenerationRequest(prompt="hello", adapter=spec(n, adapters[n]),
                                               sampling=GREEDY)) for n in names]
    handles.append(engine.submit(GenerationRequest(prompt="hello", sampling=GREEDY)))
    results = await asyncio.gather(*(h.result() for h in handles))
    stats = engine.stats()

    families, samples = scrape(metrics)
    assert {"tessera_queue_depth", "tessera_slot_hits", "tessera_slot_misses",
            "tessera_slot_evictions", "tessera_host_cache_hits", "tessera_batch_rows",
            "tessera_batch_distinct_adapters", "tessera_merged_share",
            "tessera_step_rows"} <= families
    assert value(samples, "tessera_queue_depth") == 0
    assert value(samples, "tessera_slot_hits_total") == stats.slots.hits
    assert value(samples, "tessera_slot_misses_total") == stats.slots.misses
    assert stats.slots.evictions >= 1
    assert value(samples, "tessera_slot_evictions_total") == stats.slots.evictions
    assert value(samples, "tessera_adapter_pool_bytes") == stats.pool_bytes > 0
    assert value(samples, "tessera_adapter_derived_bytes") == stats.derived_bytes >= 0
    assert value(samples, "tessera_decode_graph_steps_total") == stats.graph_steps
    assert value(samples, "tessera_decode_graph_captures_total") == stats.graph_captures
    assert value(samples, "tessera_engine_generated_tokens_total") == stats.tokens_out == 40
    assert value(samples, "tessera_engine_finished_total", reason="length") == 5
    assert value(samples, "tessera_host_cache_hits_total") == 1
    assert value(samples, "tessera_host_cache_misses_total") == 1
    assert value(samples, "tessera_host_cache_evictions_total") == 1
    assert value(samples, "tessera_host_cache_bytes") == 4
    # one observation per forward step; its rows add up to every row ever run
    assert value(samples, "tessera_batch_rows_count") == stats.steps
    rows = {k: v for k, v in samples.items() if k[0] == "tessera_step_rows_total"}
    assert sum(rows.values()) == value(samples, "tessera_batch_rows_sum")
    # decode rows: 8 tokens -> 7 decode forwards + 1 prefill row each
    assert value(samples, "tessera_step_rows_total", mode="base", method="base") == 8
    assert value(samples, "tessera_step_rows_total", mode="merged", method="hra") == 8
    assert value(samples, "tessera_step_rows_total", mode="slot", method="lora") == 16
    assert value(samples, "tessera_batch_distinct_adapters_sum") > stats.steps  # mixed steps
    assert value(samples, "tessera_merged_share") == pytest.approx(8 / 40)
    assert all(r.completion_tokens == 8 for r in results)


async def test_scrape_before_start_has_no_engine_series(make_engine: EngineFactory) -> None:
    engine = Engine(HermeticSettings(device="cpu"))  # not started: stats() raises
    metrics = Metrics(CollectorRegistry())
    metrics.bind_engine(engine.stats)
    families, _ = scrape(metrics)
    assert "tessera_queue_depth" not in families and "tessera_request_latency_seconds" in families
    started = await make_engine()
    metrics.bind_engine(started.stats)
    assert "tessera_queue_depth" in scrape(metrics)[0]


def test_request_events() -> None:
    metrics = Metrics(CollectorRegistry(), MetricsSettings(tenant_allowlist=["acme"]))
    metrics.observe_first_token(tenant="acme", method="lora", seconds=0.2)
    metrics.observe_request(tenant="acme", method="lora", latency_s=1.2, prompt_tokens=7,
                            completion_tokens=11, first_token_s=0.2, outcome="length")
    metrics.observe_request(tenant="zed", method=None, latency_s=0.5, prompt_tokens=3,
                            completion_tokens=1, first_token_s=0.5, outcome="TimeoutError")
    metrics.observe_adapter_load(source="redis", method="lora+bottleneck", seconds=0.03)
    metrics.observe_adapter_load(source="generated", method="hyperloader", seconds=0.4)
    metrics.observe_generation()
    metrics.observe_generation(ok=False)
    with pytest.raises(ValueError, match="source"):
        metrics.observe_adapter_load(source="disk", method="lora", seconds=1)  # type: ignore[arg-type]
    metrics.on_step(StepReport(index=0, request_ids=("r1", "r2", "r3"),
                               adapters=("k1", None, "k1"), decode_rows=3, prefill_tokens=0))

    _, s = scrape(metrics)
    acme = {"method": "lora", "tenant": "acme"}
    assert value(s, "tessera_requests_total", **acme, outcome="length") == 1
    assert value(s, "tessera_requests_total", method="base", tenant="other",
                 outcome="error") == 1
    assert value(s, "tessera_prompt_tokens_total", **acme) == 7
    assert value(s, "tessera_completion_tokens_total", **acme) == 11
    assert value(s, "tessera_request_latency_seconds_sum", **acme) == pytest.approx(1.2)
    assert value(s, "tessera_time_to_first_token_seconds_count", **acme) == 1
    assert value(s, "tessera_time_per_output_token_seconds_sum", **acme) == pytest.approx(0.1)
    # one output token: no time-per-output-token observation
    assert ("tessera_time_per_output_token_seconds_count",
            (("method", "base"), ("tenant", "other"))) not in s
    assert value(s, "tessera_adapter_load_seconds_count", source="redis", method="mixed") == 1
    assert value(s, "tessera_adapter_load_seconds_count", source="generated",
                 method="hyperloader") == 1
    assert value(s, "tessera_hyperloader_generations_total", outcome="ok") == 1
    assert value(s, "tessera_hyperloader_generations_total", outcome="error") == 1
    assert value(s, "tessera_batch_rows_sum") == 3
    assert value(s, "tessera_batch_distinct_adapters_sum") == 1
    # unbound method_of: a keyed row's method is unknown -> "other", never the key
    assert value(s, "tessera_step_rows_total", mode="slot", method="other") == 2
    assert value(s, "tessera_merged_share") == 0


def test_tenant_label_cardinality_is_bounded() -> None:
    allow = ["acme", "globex"]
    metrics = Metrics(CollectorRegistry(),
                      MetricsSettings(tenant_allowlist=allow, tenant_buckets=16))
    tenants = [f"tenant-{i}" for i in range(1000)] + allow
    for i, tenant in enumerate(tenants):
        metrics.observe_first_token(tenant=tenant, method="lora", seconds=0.01)
        metrics.observe_request(tenant=tenant, method=("lora", "hra", f"x{i}")[i % 3],
                                latency_s=0.1, prompt_tokens=1, completion_tokens=2,
                                first_token_s=0.05, outcome=f"weird-{i}")
    _, s = scrape(metrics)
    label_values = {dict(labels).get("tenant") for name, labels in s
                    if name.startswith("tessera_requests_total")}
    assert label_values <= metrics.tenant.values()
    assert len(label_values) == 18  # both allowlisted + all 16 buckets, no raw names
    assert {"acme", "globex"} <= label_values
    outcomes = {dict(labels)["outcome"] for name, labels in s
                if name == "tessera_requests_total"}
    methods = {dict(labels)["method"] for name, labels in s
               if name == "tessera_requests_total"}
    assert outcomes == {"error"} and methods == {"lora", "hra", "other"}
    assert sum(v for (name, _), v in s.items() if name == "tessera_requests_total") == 1002
    series = sum(1 for name, _ in s if name == "tessera_request_latency_seconds_count")
    assert series <= len(metrics.tenant.values()) * 3


def test_tenant_labels() -> None:
    labels = TenantLabels(["acme"], buckets=0)
    assert labels("acme") == "acme" and labels("zed") == "other" and labels(None) == "none"
    hashed = TenantLabels([], buckets=100)
    assert hashed("zed") == hashed("zed") and len(hashed("zed")) == 3
    assert len({hashed(f"t{i}") for i in range(5000)}) == 100 == len(hashed.values()) - 1
    assert method_label("dora") == "dora" and method_label("") == "base"
    assert method_label("lora+bottleneck") == "mixed"
    assert method_label("hra+hra") == "hra" and method_label("evil-id") == "other"


def test_embedded_store_state_read_at_scrape_time() -> None:
    metrics = Metrics(CollectorRegistry())
    current: list[EmbeddedStats | None] = [None]
    metrics.bind_store(lambda: current[0])
    families, _ = scrape(metrics)
    assert not {f for f in families if f.startswith("tessera_embedded_redis")}  # external
    current[0] = EmbeddedStats(up=False, restarts=2, restart_failures=3)
    _, s = scrape(metrics)
    assert value(s, "tessera_embedded_redis_up") == 0
    assert value(s, "tessera_embedded_redis_restarts_total") == 2
    assert value(s, "tessera_embedded_redis_restart_failures_total") == 3
    current[0] = EmbeddedStats(up=True, restarts=3, restart_failures=3)
    _, s = scrape(metrics)
    assert value(s, "tessera_embedded_redis_up") == 1
    assert value(s, "tessera_embedded_redis_restarts_total") == 3


def test_registries_are_per_app() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.observe_generation()
    assert b"tessera_hyperloader_generations_total 0" not in first.render()[0]
    assert 'outcome="ok"' not in second.render()[0].decode()
