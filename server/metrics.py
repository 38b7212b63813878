"""Prometheus metrics of one app, on that app's own ``CollectorRegistry``.

Two kinds of series:

- *Events* the serving layer reports as they happen: a request finished
  (:meth:`Metrics.observe_request`: latency, tokens in/out, time per output token), its first
  token (:meth:`Metrics.observe_first_token`), an adapter loaded from a tier
  (:meth:`Metrics.observe_adapter_load`), a HyperLoader generation
  (:meth:`Metrics.observe_generation`), and each forward step (:meth:`Metrics.on_step`,
  subscribed with ``engine.subscribe``: batch size, distinct adapters, merged rows).
- *State* read at scrape time by a collector (:meth:`Metrics.bind_engine`,
  :meth:`Metrics.bind_host_cache`, :meth:`Metrics.bind_store`): queue depth, running rows,
  slot-pool and host-cache hits / misses / evictions, the embedded redis-server's up state
  and restarts. Nothing is copied between scrapes, so the counters can never drift from
  the engine's own.

Router series (the Gateway API Inference Extension's endpoint picker, llm-d): vLLM's
names with a ``tessera:`` prefix — ``tessera:num_requests_waiting``,
``tessera:num_requests_running``, ``tessera:kv_cache_usage_perc`` (0..1 of the KV budget)
and ``tessera:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``
(value: the scrape's unix time, as vLLM sets it; the adapter lists are the ``model`` names
requests used, comma-separated, bounded by the running batch and the queue), plus
``tessera_request_queue_time_seconds`` and resident adapters per tier.

Labels are bounded by construction: ``method`` is an adapter method name from the
registry, ``"base"``, ``"mixed"`` (a stack of several methods) or ``"other"``; ``tenant``
goes through :class:`TenantLabels` (an allowlist, else one of ``tenant_buckets`` hash
buckets, else ``"other"``). Request, adapter and task ids never become label values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tessera.adapters import registry
from tessera.engine.core import Engine, EngineStats
from tessera.engine.errors import EngineStoppedError
from tessera.engine.scheduler import StepReport
from tessera.store.cache import CacheStats
from tessera.store.embedded import EmbeddedStats

log = logging.getLogger(__name__)

LoadSource = Literal["device", "host", "redis", "generated"]
LOAD_SOURCES: tuple[LoadSource, ...] = ("device", "host", "redis", "generated")
OTHER = "other"
BASE = "base"
MIXED = "mixed"
OUTCOMES = frozenset({"stop", "length", "cancelled", "shutdown", "error", "rejected"})

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0)


class MetricsSettings(BaseSettings):
    """``TESSERA_METRICS_*``: how tenants become label values."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_METRICS_", extra="forbid")

    tenant_allowlist: list[str] = Field(
        default_factory=list, max_length=100,
        description="tenants labelled by their own name (the big ones worth watching)")
    tenant_buckets: int = Field(
        0, ge=0, le=256, description="other tenants go to one of this many hash buckets "
                                     "('t00'..); 0 = all of them are 'other'")
    merged_window_rows: int = Field(4096, ge=1, description="recent forward rows over "
                                                            "which the merged share is taken")


class TenantLabels:
    """Tenant name -> a label value from a fixed, finite set."""

    def __init__(self, allowlist: Iterable[str] = (), buckets: int = 0) -> None:
        self.allowlist = frozenset(allowlist)
        self.buckets = buckets
        self._width = len(str(max(buckets - 1, 0)))

    def __call__(self, tenant: str | None) -> str:
        if tenant is None:
            return "none"
        if tenant in self.allowlist:
            return tenant
        if self.buckets == 0:
            return OTHER
        digest = hashlib.blake2b(tenant.encode(), digest_size=8).digest()
        return f"t{int.from_bytes(digest, 'big') % self.buckets:0{self._width}d}"

    def values(self) -> frozenset[str]:
        """Every value :meth:`__call__` can return."""
        width = self._width
        buckets = {f"t{i:0{width}d}" for i in range(self.buckets)} or {OTHER}
        return self.allowlist | buckets | {"none"}


def method_label(method: str | None) -> str:
    """An adapter's method(s) (``"lora"``, ``"lora+bottleneck"``, None = base) as a label."""
    if not method:
        return BASE
    parts = set(method.split("+"))  # one entry per component: "hra+hra" is plain hra
    if len(parts) > 1:
        return MIXED
    name = parts.pop()
    return name if name in registry.all_names() else OTHER


class Metrics:
    """Every series of one app. Build one per app: ``Metrics(CollectorRegistry())``."""

    def __init__(self, registry_: CollectorRegistry,
                 settings: MetricsSettings | None = None) -> None:
        settings = settings or MetricsSettings()
        self.registry = registry_
        self.tenant = TenantLabels(settings.tenant_allowlist, settings.tenant_buckets)
        labels = ("method", "tenant")
        self.requests = Counter("tessera_requests", "Finished inference requests",
                                (*labels, "outcome"), registry=registry_)
        self.latency = Histogram("tessera_request_latency_seconds",
                                 "Submit to last token", labels, buckets=LATENCY_BUCKETS,
                                 registry=registry_)
        self.ttft = Histogram("tessera_time_to_first_token_seconds",
                              "Submit to first token", labels, buckets=LATENCY_BUCKETS,
                              registry=registry_)
        self.tpot = Histogram("tessera_time_per_output_token_seconds",
                              "(latency - TTFT) / (output tokens - 1)", labels,
                              buckets=TPOT_BUCKETS, registry=registry_)
        self.tokens_in = Counter("tessera_prompt_tokens", "Prompt tokens of finished requests",
                                 labels, registry=registry_)
        self.tokens_out = Counter("tessera_completion_tokens",
                                  "Generated tokens of finished requests", labels,
                                  registry=registry_)
        self.load_time = Histogram("tessera_adapter_load_seconds",
                                   "Time to get an adapter's weights, by the tier they came "
                                   "from", ("source", "method"), buckets=LOAD_BUCKETS,
                                   registry=registry_)
        self.generations = Counter("tessera_hyperloader_generations",
                                   "Adapters generated by a HyperLoader hypernetwork",
                                   ("outcome",), registry=registry_)
        self.batch_rows = Histogram("tessera_batch_rows", "Rows in one forward step",
                                    buckets=ROW_BUCKETS, registry=registry_)
        self.batch_adapters = Histogram("tessera_batch_distinct_adapters",
                                        "Distinct adapters in one forward step",
                                        buckets=(0, *ROW_BUCKETS), registry=registry_)
        self.step_rows = Counter("tessera_step_rows", "Forward rows by how their adapter ran",
                                 ("mode", "method"), registry=registry_)
        self.queue_time = Histogram("tessera_request_queue_time_seconds",
                                    "Time requests waited before joining the batch",
                                    buckets=QUEUE_BUCKETS, registry=registry_)
        self.merged_share = Gauge("tessera_merged_share",
                                  "Share of recent forward rows served from merged weights",
                                  registry=registry_)
        self.merged_share.set(0.0)
        self._recent: deque[bool] = deque(maxlen=settings.merged_window_rows)
        self._merged_count = 0
        self._method_of: Callable[[str], str | None] = lambda key: None
        self._is_merged: Callable[[str], bool] = lambda key: False
        self._state = _StateCollector()
        registry_.register(self._state)

    # --- wiring ----------------------------------------------------------------------
    def bind_engine(self, stats: Callable[[], EngineStats],
                    method_of: Callable[[str], str | None] | None = None) -> None:
        """Read ``stats()`` at each scrape (``engine.stats``); ``method_of(key)`` names an
        adapter key's method for the step series (``tessera.engine.slots.method_of``)."""
        self._state.engine = stats
        if method_of is not None:
            self._method_of = method_of

    def attach(self, engine: Engine,
               model_of: Callable[[str], str | None] | None = None) -> None:
        """Bind a started engine: its stats at scrape time and its step hook. Call once,
        in the app's lifespan after ``await engine.start()``. ``model_of(key)``: the
        ``model`` name requests used for an adapter key (the router's LoRA series)."""
        self.bind_engine(engine.stats, engine.method_of)
        if model_of is not None:
            self._state.model_of = model_of
        engine.subscribe(self.on_step)

    def bind_host_cache(self, stats: Callable[[], CacheStats]) -> None:
        self._state.cache = stats

    def bind_store(self, stats: Callable[[], EmbeddedStats | None],
                   available: Callable[[], bool] | None = None) -> None:
        """``stats()`` (``handle.embedded_stats``): the embedded redis-server's state; None
        (an external Redis) means no such series. ``available()`` (the cached store's):
        Redis answers, whichever kind it is (``tessera_store_available``)."""
        self._state.store = stats
        self._state.available = available

    def bind_merged(self, is_merged: Callable[[str], bool]) -> None:
        """``is_merged(key)``: the hot-tenant policy serves ``key``'s rows merged."""
        self._is_merged = is_merged

    # --- events ----------------------------------------------------------------------
    def observe_request(self, *, tenant: str | None, method: str | None, latency_s: float,
                        prompt_tokens: int, completion_tokens: int,
                        first_token_s: float | None = None, outcome: str = "stop") -> None:
        """A request ended. ``outcome``: its finish reason, ``"rejected"`` (refused before
        it ran) or ``"error"``; anything else counts as ``"error"``."""
        labels = (method_label(method), self.tenant(tenant))
        self.requests.labels(*labels, outcome if outcome in OUTCOMES else "error").inc()
        self.latency.labels(*labels).observe(latency_s)
        self.tokens_in.labels(*labels).inc(prompt_tokens)
        self.tokens_out.labels(*labels).inc(completion_tokens)
        if first_token_s is not None and completion_tokens > 1:
            per_token = max(latency_s - first_token_s, 0.0) / (completion_tokens - 1)
            self.tpot.labels(*labels).observe(per_token)

    def observe_first_token(self, *, tenant: str | None, method: str | None,
                            seconds: float) -> None:
        self.ttft.labels(method_label(method), self.tenant(tenant)).observe(seconds)

    def observe_adapter_load(self, *, source: LoadSource, method: str | None,
                             seconds: float) -> None:
        if source not in LOAD_SOURCES:
            raise ValueError(f"unknown load source {source!r}")
        self.load_time.labels(source, method_label(method)).observe(seconds)

    def observe_generation(self, *, ok: bool = True) -> None:
        self.generations.labels("ok" if ok else "error").inc()

    def on_step(self, report: StepReport) -> None:
        """``engine.subscribe(metrics.on_step)``: runs once per forward."""
        self.batch_rows.observe(len(report.adapters))
        for waited in report.queued:
            self.queue_time.observe(waited)
        self.batch_adapters.observe(report.distinct_adapters)
        flags = report.merged or tuple(k is not None and self._is_merged(k)
                                       for k in report.adapters)
        for key, merged in zip(report.adapters, flags, strict=True):
            mode = BASE if key is None else "merged" if merged else "slot"
            method = None if key is None else self._method_of(key) or OTHER
            self.step_rows.labels(mode, method_label(method)).inc()
            if len(self._recent) == self._recent.maxlen and self._recent[0]:
                self._merged_count -= 1
            self._recent.append(merged)
            self._merged_count += merged
        if self._recent:
            self.merged_share.set(self._merged_count / len(self._recent))

    # --- exposition ------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The scrape body and its content type (``/metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """Engine and host-cache state, read at scrape time."""

    def __init__(self) -> None:
        self.engine: Callable[[], EngineStats] | None = None
        self.cache: Callable[[], CacheStats] | None = None
        self.store: Callable[[], EmbeddedStats | None] | None = None
        self.model_of: Callable[[str], str | None] = lambda key: None
        self.available: Callable[[], bool] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on what is bound; collect() is cheap and side-free

    def collect(self) -> Iterator[Metric]:
        stats: EngineStats | None = None
        if self.engine is not None:
            try:
                stats = self.engine()
            except EngineStoppedError:
                stats = None  # not started yet / stopped: no engine series this scrape
            if stats is not None:
                yield from _engine_families(stats)
                yield from _router_families(stats, self.model_of)
        if self.cache is not None:
            cache = self.cache()
            yield from _cache_families(cache)
            resident = GaugeMetricFamily("tessera_adapters_resident",
                                         "Adapters held, by tier (Redis holds every one)",
                                         labels=("tier",))
            resident.add_metric(("host",), cache.entries)
            if stats is not None:
                resident.add_metric(("device",), stats.resident_adapters)
            yield resident
        if self.store is not None and (embedded := self.store()) is not None:
            yield from _store_families(embedded)
        if self.available is not None:
            yield _gauge("tessera_store_available",
                         "1 while Redis answers this replica (external or embedded), else 0",
                         1.0 if self.available() else 0.0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _engine_families(s: EngineStats) -> Iterator[Metric]:
    yield _gauge("tessera_queue_depth", "Requests waiting to join the batch", s.queue_depth)
    yield _gauge("tessera_running_rows", "Rows decoding in the batch", s.running_rows)
    yield _gauge("tessera_prefilling_rows", "Rows being prefilled", s.prefilling_rows)
    yield _gauge("tessera_last_batch_rows", "Rows in the latest forward", s.last_batch_size)
    yield _counter("tessera_engine_steps", "Forward steps", s.steps)
    yield _counter("tessera_engine_prefill_tokens", "Prompt tokens prefilled", s.tokens_in)
    yield _counter("tessera_engine_generated_tokens", "Tokens generated", s.tokens_out)
    finished = CounterMetricFamily("tessera_engine_finished", "Requests ended, by reason",
                                   labels=("reason",))
    for reason, n in sorted(s.finished.items()):
        finished.add_metric((reason,), n)
    yield finished
    slots = s.slots
    yield _counter("tessera_slot_hits", "Requests whose adapter was on the device", slots.hits)
    yield _counter("tessera_slot_misses", "Requests that waited for a slot load",
                   slots.misses)
    yield _counter("tessera_slot_evictions", "Device-resident adapters replaced",
                   slots.evictions)
    yield _counter("tessera_slot_loads", "Slot loads started", slots.loads)
    yield _counter("tessera_slot_load_failures", "Slot loads that failed",
                   slots.load_failures)
    yield _counter("tessera_slot_load_seconds", "Time spent in slot loads",
                   slots.load_seconds_total)
    yield _gauge("tessera_slot_resident_adapters", "Adapters resident on the device",
                 s.resident_adapters)
    yield _gauge("tessera_adapter_pool_bytes", "Device bytes of the slot pool's banks",
                 s.pool_bytes)
    yield _gauge("tessera_adapter_derived_bytes", "Device bytes kept derived from the slots "
                 "(stacked factors, HUT dense weights; bounded per bank)", s.derived_bytes)


def _router_families(s: EngineStats, model_of: Callable[[str], str | None]
                     ) -> Iterator[Metric]:
    """vLLM's router-facing series under tessera's prefix (the endpoint picker's flags
    name them; docs/serving.md, "For a LoRA-aware router")."""
    yield _gauge("tessera:num_requests_waiting", "Requests waiting to join the batch",
                 s.queue_depth)
    yield _gauge("tessera:num_requests_running", "Requests in the batch (decoding or "
                 "prefilling)", s.running_rows + s.prefilling_rows)
    usage = s.kv_tokens_used / s.kv_tokens_total if s.kv_tokens_total else 0.0
    yield _gauge("tessera:kv_cache_usage_perc", "Share of the KV budget in use (0..1)",
                 min(usage, 1.0))
    yield _gauge("tessera_kv_cache_tokens_used", "KV positions held, rounded up to blocks",
                 s.kv_tokens_used)
    yield _gauge("tessera_kv_cache_tokens", "KV budget in token positions",
                 s.kv_tokens_total)
    yield _gauge("tessera_kv_cache_tokens_rows", "KV positions the rows' own lengths need, "
                 "each rounded up to blocks (what paged blocks would hold)", s.kv_tokens_rows)
    yield _counter("tessera_preemptions", "Rows preempted for the KV budget (recomputed)",
                   s.preemptions)
    yield _counter("tessera_decode_graph_steps", "Decode steps run static: replayed CUDA "
                   "graphs (or uncaptured, TESSERA_DECODE_GRAPHS=eager)", s.graph_steps)
    yield _counter("tessera_decode_graph_captures", "Decode steps captured as CUDA graphs",
                   s.graph_captures)

    def names(keys: Iterable[str]) -> str:
        return ",".join(sorted({m for k in keys if (m := model_of(k)) is not None}))

    info = GaugeMetricFamily(
        "tessera:lora_requests_info", "Adapters in the batch and in the queue (value: time)",
        labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"))
    info.add_metric((str(s.max_slots), names(s.running_adapters), names(s.waiting_adapters)),
                    time.time())
    yield info


def _cache_families(c: CacheStats) -> Iterator[Metric]:
    yield _counter("tessera_host_cache_hits", "Host-cache lookups that hit", c.hits)
    yield _counter("tessera_host_cache_misses", "Host-cache lookups that missed", c.misses)
    yield _counter("tessera_host_cache_evictions", "Host-cache entries evicted", c.evictions)
    yield _counter("tessera_host_cache_oversize", "Entries too large for the host cache",
                   c.oversize)
    yield _gauge("tessera_host_cache_entries", "Adapters in the host cache", c.entries)
    yield _gauge("tessera_host_cache_bytes", "Bytes in the host cache", c.bytes)
    yield _gauge("tessera_host_cache_max_bytes", "Host-cache budget", c.max_bytes)


def _store_families(e: EmbeddedStats) -> Iterator[Metric]:
    yield _gauge("tessera_embedded_redis_up",
                 "1 while the embedded redis-server runs, 0 while it is down or restarting",
                 1.0 if e.up else 0.0)
    yield _counter("tessera_embedded_redis_restarts",
                   "Times the embedded redis-server died and was started again", e.restarts)
    yield _counter("tessera_embedded_redis_restart_failures",
                   "Embedded redis-server restart attempts that failed (retried with backoff)",
                   e.restart_failures)
