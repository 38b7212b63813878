"""The demo's server: the real app (``create_app``) under uvicorn in a background thread of
this process, on the embedded defaults — the built-in trained model, an embedded
redis-server on ``data_dir`` — and a record of every forward step it runs.

In-process so the demo can subscribe to the engine's step reports
(:class:`tessera.engine.scheduler.StepReport`: the adapter of every row of one forward)
and count, per batch, the distinct adapters and the distinct methods; clients still talk
to it over real HTTP on a loopback port.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tessera.engine.scheduler import StepReport
from tessera.engine.settings import EngineSettings
from tessera.server.runner import BackgroundServer
from tessera.server.server_settings import ServerSettings
from tessera.store.settings import StoreSettings


def demo_settings(data_dir: Path, admin_key: str, *, redis_url: str | None = None,
                  num_slots: int = 16, engine: dict[str, Any] | None = None) -> ServerSettings:
    """The embedded defaults with the demo's slots; read from no environment variable
    (``model_validate``), so a ``TESSERA_MODEL`` meant for ``serve`` cannot swap the base
    the demo adapters were trained for."""
    return ServerSettings.model_validate({
        "admin_key": admin_key,
        "engine": EngineSettings.model_validate({"num_slots": num_slots, **(engine or {})}),
        "store": StoreSettings.model_validate({"redis_url": redis_url, "data_dir": data_dir}),
    })


@dataclass(frozen=True)
class StepMix:
    rows: int
    base_rows: int
    adapters: int  # distinct adapters in the forward
    methods: frozenset[str]  # distinct methods (labels) in the forward


class BatchLog:
    """A step observer: for each forward, its distinct adapters and methods. ``model_of``
    maps an engine adapter key to the ``model`` (task) name its requests used, ``labels``
    a task name to its method label (a task not in it counts as ``"other"``)."""

    def __init__(self, model_of: Callable[[str], str | None],
                 labels: Mapping[str, str]) -> None:
        self.model_of = model_of
        self.labels = labels
        self.steps: list[StepMix] = []

    def __call__(self, report: StepReport) -> None:
        keys = {a for a in report.adapters if a is not None}
        labels = frozenset(self.labels.get(self.model_of(k) or "", "other") for k in keys)
        self.steps.append(StepMix(len(report.adapters),
                                  sum(a is None for a in report.adapters), len(keys), labels))

    def clear(self) -> None:
        self.steps = []

    def summary(self) -> dict[str, Any]:
        adapters = [s.adapters for s in self.steps if s.adapters]
        methods = [len(s.methods) for s in self.steps if s.adapters]
        seen = sorted(set().union(*(s.methods for s in self.steps))) if self.steps else []
        return {
            "steps": len(self.steps), "steps_with_adapters": len(adapters),
            "rows_mean": round(statistics.fmean(s.rows for s in self.steps), 2)
            if self.steps else 0.0,
            "adapters_mean": round(statistics.fmean(adapters), 2) if adapters else 0.0,
            "adapters_max": max(adapters, default=0),
            "methods_mean": round(statistics.fmean(methods), 2) if methods else 0.0,
            "methods_max": max(methods, default=0),
            "mixed_method_share": round(sum(m >= 2 for m in methods) / len(methods), 3)
            if methods else 0.0,
            "methods_seen": seen,
        }


class DemoServer(BackgroundServer):
    """``create_app(settings)`` served on ``127.0.0.1:port`` from a daemon thread, with the
    demo's views of it: the forward steps it runs and its ``/metrics``."""

    def __init__(self, settings: ServerSettings, port: int | None = None,
                 start_timeout_s: float = 300) -> None:
        super().__init__(settings, port, start_timeout_s=start_timeout_s,
                         thread_name="tessera-demo-server")

    def record_batches(self, labels: Mapping[str, str]) -> BatchLog:
        """Record every forward step from now on; ``labels``: task name -> method."""
        log = BatchLog(self.app.state.service.model_of, labels)
        self.app.state.engine.subscribe(log)
        return log

    def metrics(self) -> dict[str, float]:
        """``/metrics``: count and sum of ``tessera_batch_distinct_adapters``."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            for suffix in ("_count", "_sum"):
                name = f"tessera_batch_distinct_adapters{suffix}"
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    out[suffix[1:]] = float(line.rsplit(" ", 1)[1])
        return out
