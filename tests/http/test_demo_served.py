"""The shipped demo adapters — LoRA, DoRA, HRA, HUT, SoKA, bottleneck and a HyperLoader's
tasks (a new task embedding among them) — served together over real HTTP from a real
redis-server on the built-in trained model: every held-out example of every task, sent
concurrently and shuffled, scores the same exact match as the training code measures
in-process (within one point), the adapters do their task (>= 90%, the new task >= 80%)
where the base scores <= 10%, and the server's forwards really mixed adapters of every
method (from the engine's step reports and /metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tessera.engine import builtin
from tessera.store.embedded import EmbeddedRedis
from tessera.train import demo_client, demo_eval
from tessera.train.base import Base, load_base
from tessera.train.demo_server import BatchLog
from tessera.train.demo_suite import ASSETS, DemoManifest, load_manifest
from tests.http.conftest import ADMIN_KEY, server_settings
from tests.live import LiveServer

METHODS = {"lora", "dora", "hra", "hut", "soka", "bottleneck", "hyperloader"}


@pytest.fixture(scope="module")
def manifest() -> DemoManifest:
    return load_manifest(ASSETS)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin.materialise(tmp_path_factory.mktemp("trained") / "model", "trained")


@pytest.fixture(scope="module")
def demo_live(redis_server: EmbeddedRedis, trained_dir: Path) -> Iterator[LiveServer]:
    settings = server_settings(redis_server, trained_dir, num_slots=16, max_rank=16,
                               max_bottleneck_dim=64)
    with LiveServer(settings) as server:
        yield server


def in_process(base: Base, manifest: DemoManifest) -> dict[tuple[str, str], float]:
    """(served task, demo task) -> held-out exact match by the training code's evaluation."""
    out = {}
    for entry in manifest.adapters:
        out[(entry.served_task, entry.task)] = demo_eval.adapter_accuracy(
            entry, ASSETS, base, manifest).accuracy
    hyper = manifest.hyperloader
    new = hyper.new_task
    hypernet = demo_eval.load_hyper(ASSETS / hyper.folder,
                                    (new.task, ASSETS / new.embedding) if new else None)
    for task in hypernet.tasks:
        adapter = demo_eval.hyper_adapter(hypernet, task, base)
        out[(hyper.served_task(task), task)] = demo_eval.accuracy(
            base, adapter, demo_eval.manifest_held_out(task, manifest)).accuracy
    for task in manifest.tasks:
        out[("base", task)] = demo_eval.accuracy(
            base, None, demo_eval.manifest_held_out(task, manifest)).accuracy
    return out


def test_served_together_as_trained(demo_live: LiveServer, trained_dir: Path,
                                    manifest: DemoManifest) -> None:
    start = time.perf_counter()
    key, served = demo_client.install(demo_live.url, ADMIN_KEY, manifest, ASSETS)
    assert {s.label for s in served} == METHODS | {"base"}
    batches = BatchLog(demo_live.app.state.service.model_of, {s.task: s.label for s in served})
    demo_live.app.state.engine.subscribe(batches)
    jobs = demo_client.jobs_for(served, manifest, limit=None)  # every held-out example
    scores = demo_client.score(demo_live.url, key, jobs, concurrency=64)
    served_seconds = time.perf_counter() - start

    reference = in_process(load_base(trained_dir), manifest)
    got = {(s.served.task, s.served.demo_task): s for s in scores}
    assert set(got) == set(reference)
    recorded = {(a.served_task, a.task): a.accuracy for a in manifest.adapters}
    hyper = manifest.hyperloader
    recorded |= {(hyper.served_task(t), t): a for t, a in hyper.accuracy.items()}
    if hyper.new_task is not None:
        new = hyper.new_task
        recorded[(hyper.served_task(new.task), new.task)] = new.accuracy
    for k, want in reference.items():
        score = got[k]
        print(f"{k[0]:<18} {k[1]:<8} served {score.accuracy:6.3f}  in-process "  # noqa: T201
              f"{want:6.3f}  ({score.correct}/{score.total})")
        assert score.total == manifest.n_eval
        assert abs(score.accuracy - want) <= 0.01, k  # served as it trained
        if k[0] == "base":
            assert want <= 0.10, k
            continue
        assert abs(want - recorded[k]) <= 0.01, k  # the shipped files are what was measured
        new_task = hyper.new_task is not None and k[1] == hyper.new_task.task \
            and k[0] == hyper.served_task(k[1])
        assert want >= (0.80 if new_task else 0.90), k

    summary = batches.summary()
    print(f"{len(jobs)} requests in {served_seconds:.1f} s; batches: {summary}")  # noqa: T201
    assert summary["methods_max"] == len(METHODS)  # one forward held every method
    assert summary["adapters_max"] >= 8
    assert summary["mixed_method_share"] >= 0.5
    metrics = httpx.get(f"{demo_live.url}/metrics").text
    observed = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("tessera_batch_distinct_adapters_")}
    assert observed["tessera_batch_distinct_adapters_sum"] \
        / observed["tessera_batch_distinct_adapters_count"] > 2
