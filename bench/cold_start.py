"""Cold start over real HTTP: upload -> first token of a new adapter, and Redis -> device
slot for it, on the engine benchmark's model (~170M Llama-shaped, random weights).

The real app on loopback with its own embedded redis-server. For each of ``--adapters``
new rank-16 LoRA adapters on every projection: upload (tessera format), activate a task,
then one request of one token. Reported per adapter: upload, activate, first token (the
request, which loads the adapter from Redis into a device slot), their sum, and the
server's own ``tessera_adapter_load_seconds{source="redis"}`` (fetch, decode, validate,
lower, slot write). Then the same tasks again: the adapters are resident (slot hits).

    python -m bench.cold_start
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.engine_throughput import ALL_LINEAR, build_model, loras
from tessera.adapters import artifact
from tests.live import (
    HermeticServerSettings,
    HermeticSettings,
    HermeticStoreSettings,
    LiveServer,
)

ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex


async def redis_load_seconds(client: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the server's Redis -> slot load histogram."""
    text = (await client.get("/metrics")).text
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("source") != "redis":
                continue
            if sample.name == "tessera_adapter_load_seconds_sum":
                total += sample.value
            elif sample.name == "tessera_adapter_load_seconds_count":
                count += sample.value
    return total, count


async def first_token(client: httpx.AsyncClient, headers: dict[str, str], task: str) -> float:
    start = time.perf_counter()
    r = await client.post(f"/v1/tasks/{task}/generate", headers=headers,
                          json={"prompt": [1, 2, 3, 4], "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start


async def run(url: str, args: argparse.Namespace, model: torch.nn.Module) -> list[dict[str, float]]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = await client.post("/v1/tenants", json={"name": "bench"}, headers=admin)
        r.raise_for_status()
        headers = {"Authorization": f"Bearer {r.json()['api_key']}"}
        await first_token(client, headers, "base")  # warm the forward path
        for i, adapter in enumerate(loras(model, args.adapters, 16)):
            manifest, weights = artifact.dumps(adapter)
            t0 = time.perf_counter()
            r = await client.post(f"/v1/adapters/cold-{i}", headers=headers, files={
                "config": ("manifest.json", manifest, "application/json"),
                "weights": ("weights.safetensors", weights, "application/octet-stream")})
            r.raise_for_status()
            t1 = time.perf_counter()
            r = await client.post(f"/v1/tasks/cold-{i}/activate", headers=headers,
                                  json={"adapter": f"cold-{i}", "version": 1})
            r.raise_for_status()
            t2 = time.perf_counter()
            before = await redis_load_seconds(client)
            first = await first_token(client, headers, f"cold-{i}")
            after = await redis_load_seconds(client)
            warm = await first_token(client, headers, f"cold-{i}")
            rows.append({"mb": len(weights) / 2**20, "upload_s": t1 - t0,
                         "activate_s": t2 - t1, "first_token_s": first,
                         "upload_to_first_token_s": t1 - t0 + (t2 - t1) + first,
                         "redis_to_slot_s": (after[0] - before[0]) / max(after[1] - before[1], 1),
                         "resident_request_s": warm})
            print(f"  adapter {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()),
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results/cold_start.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tessera-cold-") as tmp:
        root = Path(tmp)
        model = build_model(args, root / "model")
        engine = HermeticSettings(model=str(root / "model"), device="cpu", dtype="float32",
                                  num_slots=args.adapters + 1, max_rank=16, methods=["lora"],
                                  target_modules=ALL_LINEAR)
        settings = HermeticServerSettings(
            admin_key=ADMIN_KEY, engine=engine,
            store=HermeticStoreSettings(redis_url=None, data_dir=root / "redis"))
        with LiveServer(settings) as live:
            rows = asyncio.run(run(live.url, args, model))
    keys = [k for k in rows[0] if k != "mb"]
    median = {k: statistics.median(r[k] for r in rows) for k in keys}
    print(f"\ncold start, rank-16 LoRA on every projection ({rows[0]['mb']:.1f} MiB), Llama "
          f"hidden {args.hidden} x {args.layers}, fp32, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; median of {len(rows)} adapters")
    for k, v in median.items():
        print(f"  {k:<26}{v * 1e3:9.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows,
                               "median": median}, indent=2))


if __name__ == "__main__":
    main()
