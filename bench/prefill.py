"""Prefill through the engine beside one batched forward of the plain model, same run.

    python -m bench.prefill --reps 3

Same model as ``bench.engine_throughput`` (Llama-shaped, random weights, hidden 1024,
8 layers, vocab 32000, fp32). Two measurements, each against the forward a perfect
engine would need for the same tokens (the plain ``transformers`` model, one batch, no
cache kept, last-token logits only):

- ``--requests`` (16) requests of ``--prompt`` (256) tokens with ``max_tokens=1``, all
  submitted at once, end to end (submission to the last result) vs one ``[16, 256]``
  forward; base, and the requests spread over ``--adapters`` (8) LoRA r16 adapters on every
  projection (resident beforehand) vs the same forward;
- the throughput workload's TTFT: 32 requests of 128 tokens, 128 new each, all at once;
  the engine's median time to first token vs one ``[32, 128]`` forward.

Each forward is also timed on a copy of the model whose linears run oneDNN on packed
weights, as the engine's do (``tessera.adapters.kernels``): the ratios against it are the
engine's own overhead, those against the plain model what a user gains over it.

The engine runs on its defaults (``prefill_tokens_per_step`` 2048: a 4,096-token burst
is two prefill forwards with a decode step between). Writes
``bench/results/prefill.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine_throughput import build_model, loras, spec
from tessera.adapters import Adapter, kernels
from tessera.engine import Engine, GenerationRequest, SamplingParams
from tests.live import HermeticSettings


def batch(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def forward_s(model: torch.nn.Module, work: list[list[int]]) -> float:
    """One batched forward over ``work`` (same length), last-token logits only."""
    ids = torch.tensor(work)  # [B, T]
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


async def burst_s(engine: Engine, work: list[list[int]], adapters: list[Adapter]) -> float:
    """Every request of ``work`` submitted at once, ``max_tokens=1``: seconds to the last."""
    specs = [spec(i, a) for i, a in enumerate(adapters)]
    once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    await asyncio.gather(*(engine.submit(GenerationRequest(
        prompt=p, adapter=specs[i % len(specs)] if specs else None, sampling=once)).result()
        for i, p in enumerate(work)))
    return time.perf_counter() - start


async def ttft_p50_s(engine: Engine, work: list[list[int]], new: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    firsts: list[float] = []

    async def consume(prompt: list[int]) -> None:
        handle = engine.submit(GenerationRequest(prompt=prompt, sampling=params))
        n = 0
        async for _ in handle:  # to the end: the workload's decode steps delay later rows
            if n == 0:
                firsts.append(time.perf_counter() - start)
            n += 1

    await asyncio.gather(*(consume(p) for p in work))
    return statistics.median(firsts)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    burst = batch(args.requests, args.prompt, args.vocab, seed=3)
    load = batch(32, 128, args.vocab, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, Path(tmp))
        packed = copy.deepcopy(model)  # the engine's kernel (tessera.adapters.kernels)
        kernels.pack_linears(packed)
        settings = HermeticSettings(
            model=tmp, device="cpu", dtype="float32", num_slots=args.adapters, max_rank=16,
            max_batch_rows=32, max_queue=256, context_limit=512, hot_merge=False,
            methods=["lora"], max_tokens_limit=128, default_max_tokens=128)
        engine = Engine(settings)
        await engine.start()
        adapters = loras(model, args.adapters, 16)
        times: dict[str, list[float]] = {k: [] for k in (
            "forward_burst", "forward_burst_packed", "engine_base", "engine_lora",
            "forward_load", "forward_load_packed", "ttft_p50")}
        try:
            await burst_s(engine, burst[:2], adapters)  # warm up, slots filled
            await burst_s(engine, burst[:2], [])
            for _ in range(args.reps):  # interleaved: drift hits each alike
                times["forward_burst"].append(forward_s(model, burst))
                times["forward_burst_packed"].append(forward_s(packed, burst))
                times["engine_base"].append(await burst_s(engine, burst, []))
                times["engine_lora"].append(await burst_s(engine, burst, adapters))
                times["forward_load"].append(forward_s(model, load))
                times["forward_load_packed"].append(forward_s(packed, load))
                times["ttft_p50"].append(await ttft_p50_s(engine, load, 128))
        finally:
            await engine.stop(drain_timeout=5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med,
            "burst_base_ratio": med["engine_base"] / med["forward_burst"],
            "burst_lora_ratio": med["engine_lora"] / med["forward_burst"],
            "ttft_ratio": med["ttft_p50"] / med["forward_load"],
            "packed": {"burst_base_ratio": med["engine_base"] / med["forward_burst_packed"],
                       "burst_lora_ratio": med["engine_lora"] / med["forward_burst_packed"],
                       "ttft_ratio": med["ttft_p50"] / med["forward_load_packed"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/prefill.json")
    args = parser.parse_args()
    found = asyncio.run(main_async(args))
    s = found["seconds"]
    print(f"Llama hidden {args.hidden} x {args.layers}, vocab {args.vocab}, fp32, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"median of {args.reps}")
    print(f"{args.requests} x {args.prompt} tokens, max_tokens=1: one batched forward "
          f"{s['forward_burst']:.2f} s; engine base {s['engine_base']:.2f} s "
          f"({found['burst_base_ratio']:.2f}x), {args.adapters} LoRA r16 "
          f"{s['engine_lora']:.2f} s ({found['burst_lora_ratio']:.2f}x)")
    print(f"32 x (128 + 128): TTFT p50 {s['ttft_p50']:.2f} s vs one [32, 128] forward "
          f"{s['forward_load']:.2f} s ({found['ttft_ratio']:.2f}x)")
    k = found["packed"]
    print(f"vs the same forwards with packed linears (the engine's kernel): burst "
          f"{s['forward_burst_packed']:.2f} s (base {k['burst_base_ratio']:.2f}x, LoRA "
          f"{k['burst_lora_ratio']:.2f}x), [32, 128] {s['forward_load_packed']:.2f} s "
          f"(TTFT {k['ttft_ratio']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               **found}, indent=2))


if __name__ == "__main__":
    main()
