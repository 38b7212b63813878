"""The demo's HTTP side: install the shipped demo adapters on a running tessera server,
then score every served task on its held-out set with concurrent, shuffled requests.

Install (a fresh tenant, through :class:`tessera.server.client.TesseraClient` and the
functions of ``tessera train --upload``, :mod:`tessera.train.upload`): each single-method
adapter is uploaded and bound to the task ``<method>-<demo task>``; the HyperLoader
hypernetwork (its training tasks inside) is uploaded, the new task's embedding registered
on that version, and ``hyper-<demo task>`` bound to each of its tasks. Score: for
every served task and for the base (``base``) on every demo task, one greedy request per
held-out example (``temperature 0``, ``ignore_eos``, as many tokens as the completion
has), all in one shuffled stream with many in flight, so the server's batches mix
adapters of every method; a prediction is correct when the generated text up to and
including the first ``"\\n"`` equals the completion (the rule of
:func:`tessera.train.evaluate.exact_match`).

Torch-free: httpx, the client and the task suite only. Scoring sends its requests with
httpx's async client (many in flight from one thread).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tessera.server.client import TesseraClient
from tessera.train import tasks
from tessera.train.demo_suite import HYPER_PREFIX, DemoManifest
from tessera.train.upload import add_task, upload_and_activate, upload_hypernetwork

log = logging.getLogger(__name__)

BASE = "base"  # the server's alias for "no adapter"
TERMINATOR = tasks.TERMINATOR


@dataclass(frozen=True)
class Served:
    """One served task: its name on the server, what it should do, what runs it."""

    task: str  # the task name requests use ("base": the base model)
    demo_task: str  # the demo task it is scored on
    label: str  # lora, dora, hra, hut, soka, bottleneck, hyperloader, base
    adapter: str | None  # the adapter (or hypernetwork) name; None for the base
    expected: float | None  # held-out exact match measured in-process at build time


@dataclass(frozen=True)
class Job:
    served: Served
    prompt: str
    completion: str


@dataclass(frozen=True)
class Score:
    served: Served
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text}")
    return response


def install(url: str, admin_key: str, manifest: DemoManifest, assets: Path,
            tenant: str | None = None) -> tuple[str, list[Served]]:
    """A new tenant with every demo adapter bound; returns its API key and the served
    tasks (the base's, one per demo task, last). A refused call raises the client's
    :class:`~tessera.server.client.TesseraError`."""
    name = tenant or f"demo-{secrets.token_hex(4)}"
    with TesseraClient(url, admin_key) as admin:
        key = admin.create_tenant(name)["api_key"]
    served: list[Served] = []
    hyper = manifest.hyperloader
    with TesseraClient(url, key, timeout=120) as client:
        for entry in manifest.adapters:
            upload_and_activate(client, assets / entry.folder, entry.name, entry.served_task)
            served.append(Served(entry.served_task, entry.task, entry.method, entry.name,
                                 entry.accuracy))
        done = upload_hypernetwork(client, assets / hyper.folder, hyper.name, HYPER_PREFIX)
        bound = dict(done.tasks)
        expected = dict(hyper.accuracy)
        if hyper.new_task is not None:
            new = hyper.new_task
            added = add_task(client, assets / new.embedding, hyper.name,
                             done.hypernetwork["version"], new.task, HYPER_PREFIX)
            bound |= added.tasks
            expected[new.task] = new.accuracy
    for task in expected:  # the manifest's order: its tasks, then the new one
        served.append(Served(bound[task]["task"], task, "hyperloader", hyper.name,
                             expected[task]))
    served += [Served(BASE, task, BASE, None, None) for task in manifest.tasks]
    log.info("demo adapters installed", extra={"tenant": name, "tasks": len(served)})
    return key, served


def jobs_for(served: Sequence[Served], manifest: DemoManifest, limit: int | None,
             seed: int = 0) -> list[Job]:
    """One job per (served task, held-out example), shuffled (seeded) across tasks."""
    cache: dict[str, list[dict[str, str]]] = {}
    jobs = []
    for s in served:
        if s.demo_task not in cache:
            _, held_out = tasks.splits(s.demo_task, manifest.n_train, manifest.n_eval,
                                       manifest.seed)
            cache[s.demo_task] = held_out if limit is None else held_out[:limit]
        jobs += [Job(s, e["prompt"], e["completion"]) for e in cache[s.demo_task]]
    random.Random(seed).shuffle(jobs)
    return jobs


def prediction(text: str, terminator: str = TERMINATOR) -> str:
    """The generated text up to and including the first terminator (all of it if none)."""
    at = text.find(terminator)
    return text if at < 0 else text[:at + len(terminator)]


async def _one(http: httpx.AsyncClient, job: Job, gate: asyncio.Semaphore) -> bool:
    body = {"prompt": job.prompt, "max_tokens": len(job.completion.encode()),
            "temperature": 0, "ignore_eos": True}
    async with gate:
        response = await http.post(f"/v1/tasks/{job.served.task}/generate", json=body)
    _check(response)
    return prediction(response.json()["text"]) == job.completion


async def score_async(url: str, key: str, jobs: Sequence[Job], *, concurrency: int = 64,
                      on_done: Callable[[], None] | None = None) -> list[Score]:
    """Send every job, ``concurrency`` in flight at a time; per served task, the score."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=300, limits=limits) as http:

        async def run(job: Job) -> bool:
            ok = await _one(http, job, gate)
            if on_done is not None:
                on_done()
            return ok

        outcomes = await asyncio.gather(*(run(job) for job in jobs))
    totals: dict[tuple[str, str], list[int]] = {}
    order: dict[tuple[str, str], Served] = {}
    for job, ok in zip(jobs, outcomes, strict=True):
        k = (job.served.task, job.served.demo_task)
        order.setdefault(k, job.served)
        counts = totals.setdefault(k, [0, 0])
        counts[0] += ok
        counts[1] += 1
    return [Score(order[k], *totals[k]) for k in order]


def score(url: str, key: str, jobs: Sequence[Job], *, concurrency: int = 64,
          on_done: Callable[[], None] | None = None) -> list[Score]:
    return asyncio.run(score_async(url, key, jobs, concurrency=concurrency, on_done=on_done))
