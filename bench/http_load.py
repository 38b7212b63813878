"""HTTP load benchmark: concurrent streaming clients, Zipf-popular adapters over a pool
larger than the device slots, beside the same run with every request on the base model.

The real app (``create_app``) is served in-process by uvicorn on a free loopback port, with
its own embedded redis-server in a temporary data directory and the built-in model (or
``--model``, a local directory: nothing is downloaded). A tenant uploads ``--adapters``
random adapters (tessera format, methods round-robin) and activates one task per adapter.
Then two phases run the same request schedule (same prompts, same lengths, greedy,
``ignore_eos``) through the native SSE endpoint with ``--concurrency`` clients:

* ``adapters``: each request's task is drawn Zipf(s) over the adapter tasks;
* ``base``: every request on the base model.

Client-side it measures throughput (requests/s, output tokens/s), TTFT (send -> first
token event) and TPOT ((last - first token) / (tokens - 1)) p50/p99, errors by status, and
from ``/metrics`` the slot hits/misses/evictions/loads each phase caused. Prints a table and
writes JSON. Compare the ratio adapters/base, not absolute numbers (one machine, one run).

    python -m bench.http_load                       # defaults used for the README table
    python -m bench.http_load --requests 40 --max-tokens 8     # quick look
    python -m bench.http_load --model /models/llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from transformers import AutoModelForCausalLM

from tessera.adapters import artifact
from tessera.engine import builtin
from tests.factories import FACTORIES
from tests.live import (
    HermeticServerSettings,
    HermeticSettings,
    HermeticStoreSettings,
    LiveServer,
)

METHODS = ("lora", "dora", "hra", "hut", "soka", "bottleneck")
ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex
# Prompts of different lengths, so rows of one batch differ (and padding does too).
PROMPTS = ("hello world", "a", "The quick brown fox jumps over the lazy dog",
           "Once upon a time, in a land far away, there lived", "x = 1\ny = 2\nprint(x + y)",
           "tessera serves many adapters", "Summarise: the meeting moved to Tuesday.",
           "0123456789 0123456789")
SLOT_COUNTERS = ("tessera_slot_hits", "tessera_slot_misses", "tessera_slot_evictions",
                 "tessera_slot_loads", "tessera_slot_load_failures")




@dataclass
class Result:
    status: str  # "200", "429", ..., or "error:<ExceptionType>"
    tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass
class Phase:
    name: str
    wall_s: float
    results: list[Result]
    slots: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.status == "200"]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        tokens = sum(r.tokens for r in ok)
        return {
            "phase": self.name, "requests": len(self.results), "ok": len(ok),
            "wall_s": self.wall_s, "req_per_s": len(ok) / self.wall_s,
            "tok_per_s": tokens / self.wall_s, "output_tokens": tokens,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "errors": dict(Counter(r.status for r in self.results if r.status != "200")),
            "slots": self.slots,
        }


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def base_model(model_dir: Path) -> nn.Module:
    """The base weights on the CPU: the factories read module shapes (and, for DoRA, the
    weight norms) from it. Only used to build the uploaded adapters."""
    model: nn.Module = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, low_cpu_mem_usage=True)
    return model.eval()


async def stream_one(client: httpx.AsyncClient, headers: dict[str, str], task: str,
                     prompt: str, max_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first: float | None = None
    last = start
    tokens = 0
    done = False
    try:
        async with client.stream("POST", f"/v1/tasks/{task}/generate", headers=headers,
                                 json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(str(r.status_code))
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                event = json.loads(line[len("data: "):])
                if event.get("token_id") is None:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                tokens += 1
    except httpx.HTTPError as exc:
        return Result(f"error:{type(exc).__name__}", tokens)
    if not done:  # the stream ended without its [DONE]: a failure, not a success
        return Result("truncated", tokens)
    if first is None:
        return Result("200", 0)
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Result("200", tokens, first - start, tpot)


async def run_phase(name: str, client: httpx.AsyncClient, headers: dict[str, str],
                    schedule: list[tuple[str, str]], args: argparse.Namespace) -> Phase:
    before = await scrape(client)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for job in schedule:
        queue.put_nowait(job)
    results: list[Result] = []
    deadline = time.perf_counter() + args.max_seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                task, prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await stream_one(client, headers, task, prompt, args.max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    after = await scrape(client)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    slots = {k.removeprefix("tessera_slot_"): v for k, v in delta.items()
             if k.startswith(("tessera_slot_", "rows_"))}
    steps = delta.get("tessera_batch_rows_count", 0.0)
    if steps:
        slots["forward_steps"] = steps
        slots["mean_rows_per_step"] = delta.get("tessera_batch_rows_sum", 0.0) / steps
        slots["mean_adapters_per_step"] = (
            delta.get("tessera_batch_distinct_adapters_sum", 0.0) / steps)
    if queue.qsize():
        print(f"  {name}: stopped at --max-seconds with {queue.qsize()} requests not sent")
    return Phase(name, wall, results, slots)


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Counters of ``/metrics`` this benchmark reports, summed over their labels (forward
    rows kept per mode: adapter rows from merged weights vs the slot pool)."""
    r = await client.get("/metrics")
    r.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in SLOT_COUNTERS:
                out[name] = out.get(name, 0.0) + sample.value
            elif name == "tessera_step_rows":
                key = f"rows_{sample.labels.get('mode', '?')}"
                out[key] = out.get(key, 0.0) + sample.value
            elif name in ("tessera_batch_rows_sum", "tessera_batch_rows_count",
                          "tessera_batch_distinct_adapters_sum"):
                out[name] = sample.value
    return out


async def setup(client: httpx.AsyncClient, model: nn.Module,
                args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """A tenant with ``--adapters`` uploaded and activated tasks: (auth headers, tasks)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = await client.post("/v1/tenants", json={"name": "bench"}, headers=admin)
    r.raise_for_status()
    headers = {"Authorization": f"Bearer {r.json()['api_key']}"}
    methods = args.methods.split(",")
    gen = torch.Generator().manual_seed(args.seed)
    tasks = []
    for i in range(args.adapters):
        method = methods[i % len(methods)]
        manifest, weights = artifact.dumps(FACTORIES[method](model, gen))
        name = f"a{i:03d}-{method}"
        r = await client.post(
            f"/v1/adapters/{name}", headers=headers,
            files={"config": ("manifest.json", manifest, "application/json"),
                   "weights": ("weights.safetensors", weights, "application/octet-stream")})
        if r.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text}")
        task = f"task-{i:03d}-{method}"
        r = await client.post(f"/v1/tasks/{task}/activate", headers=headers,
                              json={"adapter": name, "version": 1})
        if r.status_code != 200:
            raise RuntimeError(f"activate of {task} failed: {r.status_code} {r.text}")
        tasks.append(task)
    return headers, tasks


async def bench(url: str, model: nn.Module, args: argparse.Namespace) -> list[Phase]:
    limits = httpx.Limits(max_connections=args.concurrency + 4,
                          max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits,
                                 trust_env=False) as client:
        headers, tasks = await setup(client, model, args)
        rng = random.Random(args.seed)
        # The most popular task is a random one, not always the first method.
        order = rng.sample(tasks, len(tasks))
        prompts = [rng.choice(PROMPTS) for _ in range(args.requests)]
        chosen = rng.choices(order, weights=zipf_weights(len(order), args.zipf_s),
                             k=args.requests)
        schedules = {"adapters": list(zip(chosen, prompts, strict=True)),
                     "base": [("base", p) for p in prompts]}
        warm = [("base", PROMPTS[i % len(PROMPTS)]) for i in range(args.warmup)]
        if warm:
            await run_phase("warmup", client, headers, warm, args)
        phases = []
        for name in args.order.split(","):
            print(f"  running {name}: {args.requests} requests, {args.concurrency} clients")
            phases.append(await run_phase(name, client, headers, schedules[name], args))
        return phases


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def print_table(rows: list[dict[str, Any]], ratio: dict[str, float],
                header: str) -> None:
    cols = ("req_per_s", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
            "tpot_p99_ms")
    titles = ("req/s", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
    print(header)
    print(f"{'run':16} {'ok/sent':>9} " + " ".join(f"{t:>9}" for t in titles)
          + f"  {'errors':12} {'evictions':>9} {'rows/step':>9} {'adapt/stp':>9}")
    for row in rows:
        errors = ",".join(f"{k}:{v}" for k, v in sorted(row["errors"].items())) or "0"
        print(f"{row['phase']:16} {row['ok']:>4}/{row['requests']:<4} "
              + " ".join(f"{fmt(row[c]):>9}" for c in cols)
              + f"  {errors:12} {row['slots'].get('evictions', 0):>9.0f}"
              + f" {row['slots'].get('mean_rows_per_step', math.nan):>9.1f}"
              + f" {row['slots'].get('mean_adapters_per_step', math.nan):>9.1f}")
    print(f"{'adapters/base':16} {'':>9} " + " ".join(f"{fmt(ratio[c], '.2f'):>9}"
                                                      for c in cols))
    print("(TTFT and TPOT in ms, client-side over SSE; lower is better for them, higher "
          "for req/s and tok/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local base model directory (default: built-in)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--num-slots", type=int, default=8)
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=24, help="adapter pool size")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=512, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--warmup", type=int, default=16, help="base requests before timing")
    parser.add_argument("--order", default="base,adapters", help="phases, in run order")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="per phase: no new request is sent after this")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/http_load.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_slots >= args.adapters:
        print(f"note: {args.adapters} adapters fit in {args.num_slots} slots: no evictions")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else builtin.materialise(root / "model")
        engine = HermeticSettings(
            model=args.model, builtin_dir=None if args.model else model_dir,
            device=args.device, dtype=args.dtype, num_slots=args.num_slots,
            max_batch_rows=args.max_batch_rows, max_queue=max(256, 4 * args.concurrency))
        settings = HermeticServerSettings(
            admin_key=ADMIN_KEY, engine=engine,
            store=HermeticStoreSettings(redis_url=None, data_dir=root / "redis"))
        model = base_model(model_dir)
        with LiveServer(settings) as live:
            print(f"server on {live.url} (embedded redis in {root / 'redis'})")
            phases = asyncio.run(bench(live.url, model, args))
            base_name = live.app.state.engine.base.name

    rows = [p.summary() for p in phases]
    by = {r["phase"]: r for r in rows}
    ratio: dict[str, float] = {}
    if "base" in by and "adapters" in by:
        for key in ("req_per_s", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                    "tpot_p99_ms"):
            base = by["base"][key]
            ratio[key] = by["adapters"][key] / base if base else math.nan
    cpu = platform.processor() or platform.machine()
    device = (torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available()
              else f"{cpu}, {os.cpu_count()} cores")
    header = (f"HTTP load: {args.concurrency} concurrent SSE clients, {args.requests} "
              f"requests/phase, {args.max_tokens} tokens each (greedy, ignore_eos); "
              f"{args.adapters} adapters ({args.methods}) Zipf s={args.zipf_s} over "
              f"{args.num_slots} slots; model {base_name}, {args.dtype}, {device}")
    print_table(rows, ratio, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "model": base_name, "device": device,
        "machine": platform.platform(), "torch": torch.__version__,
        "load_average": os.getloadavg(), "total_s": time.perf_counter() - started,
        "rows": rows, "adapters_vs_base": ratio}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
