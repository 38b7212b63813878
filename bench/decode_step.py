"""CPU micro-benchmark: one decode step of a mixed batch on a small Llama-shaped model.

For every method (and HyperLoader-generated adapters) it times a decode step of a batch of
``--batch`` rows spread round-robin over 1, 8 and 32 distinct adapters, relative to the base
model alone on the same batch, and for LoRA relative to PEFT's ``adapter_names`` mixed batch
with the very same adapters. Prints a table and writes JSON. Ratios, not absolute times,
are what to compare (one run, one machine, side by side).

    python -m bench.decode_step                # defaults used for the README table
    python -m bench.decode_step --reps 5 --counts 1,8 --methods lora,hra   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adapters import PoolConfig, SlotPool, registry
from adapters.peft_io import load_peft_dir
from tests.factories import FACTORIES

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    return LlamaForCausalLM(config).eval()


class DecodeStep:
    """A prefilled KV cache; ``run()`` does one decode step and crops the cache back."""

    def __init__(self, model: torch.nn.Module, batch: int, prompt: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.model = model
        self.prompt = prompt
        ids = torch.randint(0, 4096, (batch, prompt), generator=gen)
        self.cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.next_ids = torch.randint(0, 4096, (batch, 1), generator=gen)

    @torch.no_grad()
    def run(self, **kwargs: object) -> None:
        self.model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache.crop(-1)  # drop the token just decoded: every step sees the same cache


def median_ms(fn: Callable[[], None], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peft_lora_dir(model: torch.nn.Module, n: int, rank: int, root: Path) -> list[Path]:
    """``n`` random rank-``rank`` LoRA adapters on every projection, saved as PEFT does."""
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(copy.deepcopy(model), PeftLoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR, init_lora_weights=False))
        out = root / f"lora{i}"
        peft_model.save_pretrained(str(out))
        dirs.append(out)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of the PEFT-compared LoRA")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--counts", default="1,8,32")
    parser.add_argument("--methods", default=",".join(registry.all_names()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gather-budget", type=int, default=PoolConfig().gather_budget,
                        help="PoolConfig.gather_budget (0 = always segment mode)")
    parser.add_argument("--out", default="bench/results/decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    methods = args.methods.split(",")

    base_model = build_model(args)
    pristine = copy.deepcopy(base_model)
    rows: list[dict[str, object]] = []
    base_ms = median_ms(DecodeStep(base_model, args.batch, args.prompt).run, args.reps)

    pool = SlotPool(base_model, PoolConfig(num_slots=max(counts), max_rank=args.rank,
                                           max_bottleneck_dim=64,
                                           gather_budget=args.gather_budget))
    step = DecodeStep(base_model, args.batch, args.prompt)
    wrapped_ms = median_ms(lambda: step.run(), args.reps)
    rows.append({"method": "base", "adapters": 0, "ms": base_ms, "vs_base": 1.0})
    rows.append({"method": "base, wrapped (no plan)", "adapters": 0, "ms": wrapped_ms,
                 "vs_base": wrapped_ms / base_ms})

    with tempfile.TemporaryDirectory() as tmp:
        lora_dirs = peft_lora_dir(pristine, max(counts), args.rank, Path(tmp))
        peft_model = get_peft_model(copy.deepcopy(pristine), PeftLoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR))
        for i, path in enumerate(lora_dirs):
            peft_model.load_adapter(str(path), adapter_name=f"a{i}")
        peft_model.eval()
        peft_step = DecodeStep(peft_model, args.batch, args.prompt)
        for n in counts:
            names = [f"a{i % n}" for i in range(args.batch)]
            peft_ms = median_ms(lambda names=names: peft_step.run(adapter_names=names), args.reps)
            for slot in range(n):
                pool.load(slot, load_peft_dir(lora_dirs[slot]))
            slots = [i % n for i in range(args.batch)]
            with pool.use(slots):
                ms = median_ms(step.run, args.reps)
            rows.append({"method": f"lora r{args.rank} all-linear", "adapters": n, "ms": ms,
                         "vs_base": ms / base_ms, "peft_ms": peft_ms, "vs_peft": ms / peft_ms})

    for method in methods:
        gen = torch.Generator().manual_seed(7)
        adapters = [FACTORIES[method](pristine, gen) for _ in range(max(counts))]
        for n in counts:
            for slot in range(n):
                pool.load(slot, adapters[slot])
            slots = [i % n for i in range(args.batch)]
            with pool.use(slots):
                ms = median_ms(step.run, args.reps)
            rows.append({"method": method, "adapters": n, "ms": ms, "vs_base": ms / base_ms})

    print(f"decode step, batch {args.batch}, prompt {args.prompt}, Llama-shaped "
          f"hidden {args.hidden} x {args.layers} layers, fp32, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'method':28} {'adapters':>8} {'ms':>8} {'vs base':>8} {'vs PEFT':>8}")
    for row in rows:
        vs_peft = f"{row['vs_peft']:.2f}" if "vs_peft" in row else "-"
        print(f"{row['method']!s:28} {row['adapters']!s:>8} {row['ms']:8.2f} "
              f"{row['vs_base']:8.2f} {vs_peft:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
