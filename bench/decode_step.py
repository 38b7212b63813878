"""CPU micro-benchmark: one decode step of a mixed batch on a Llama-shaped model (hidden 1024
by default: at 512 per-module overhead dominates).

For every method (and HyperLoader-generated adapters) it times a decode step of a batch of
``--batch`` rows spread round-robin over 1, 8 and 32 distinct adapters, relative to the base
model alone on the same batch, and for LoRA relative to PEFT's ``adapter_names`` mixed batch
with the very same adapters, each row timed alternately with the base step (and PEFT's).
Prints a table and writes JSON. Ratios, not absolute times, are what to compare (one run,
one machine, side by side).

    python -m bench.decode_step --reps 20      # the README table
    python -m bench.decode_step --reps 5 --counts 1,8 --methods lora,hra   # quick look

``--sweep``: LoRA r16 on every projection only, batch 64 over 1, 4, 16 and 64 distinct
adapters; the base and the adapter steps are timed alternately (drift hits
both) and the ratio per count is printed and written to JSON. ``--forms``: the low-rank
bank's gather-mode forms timed one module at a time on the same shape (the numbers behind
``tessera.adapters.banks.lowrank.choose_form``).

    python -m bench.decode_step --sweep        # issue 8's table
    python -m bench.decode_step --forms --reps 10

``--long-row``: the engine's KV slab (``tessera.engine.kvcache.BatchCache``) decode step of
``--batch`` rows of ``--prompt`` tokens vs the same with one row of ``--long`` tokens
(31 short rows beside one 1,024-token row by default), base model, timed alternately;
the mixed step both as the engine runs it (attention grouped by row length,
``tessera.engine.attention``) and as one SDPA over the longest row.

    python -m bench.decode_step --long-row --batch 32 --prompt 170

``--hut-forms``: the decode step (hidden 1024, batch 32) with HUT adapters over 1, 4, 8,
16, 32 slots, the Hadamard bank's stacked and dense forms forced and as its rule picks, vs
the base step, timed alternately.

    python -m bench.decode_step --hut-forms --reps 12

``--hot``: one decode step (batch ``--batch``, LoRA r16 on every projection) with one
adapter at 75% of the rows (the others over 7 more) and at 100%: through slots vs merged
into the step (``SlotPool.hot_merge``: W0 + dW_hot, the other rows corrected), timed
alternately; rows in the engine's packed order (the hot adapter's rows first, each slot's
rows together).

    python -m bench.decode_step --hot --batch 32 --prompt 128 --layers 8
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
from functools import partial
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tessera.adapters import Adapter, Component, PoolConfig, SlotPool, kernels, registry
from tessera.adapters.banks import hadamard
from tessera.adapters.banks.lowrank import LowRankBank, choose_form
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.peft_io import load_peft_dir
from tessera.adapters.plan import Routing
from tests.factories import FACTORIES
from tests.factories.lora import lora_modules

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """The bench model; its linears packed for oneDNN as the engine loads a CPU base
    (``tessera.adapters.kernels``) unless ``--unpacked``. Copies pack their own."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    model = LlamaForCausalLM(config).eval()
    if not args.unpacked:
        kernels.pack_linears(model)
    return model


class DecodeStep:
    """A prefilled KV cache; ``run()`` does one decode step and crops the cache back."""

    def __init__(self, model: torch.nn.Module, batch: int, prompt: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.model = model
        self.prompt = prompt
        ids = torch.randint(0, 4096, (batch, prompt), generator=gen)
        self.cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, cache=self.cache, use_cache=True)
        self.next_ids = torch.randint(0, 4096, (batch, 1), generator=gen)

    @torch.no_grad()
    def run(self, **kwargs: object) -> None:
        self.model(input_ids=self.next_ids, cache=self.cache, use_cache=True, **kwargs)
        self.cache.crop(-1)  # drop the token just decoded: every step sees the same cache


def paired_ms(fns: dict[str, Callable[[], object]], reps: int,
              stat: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or ``stat``) ms of each function, timed in turns (one call of each per
    round), so that a machine slowing down mid-run slows all of them alike."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: stat(t) for name, t in times.items()}


def lora_adapters(model: torch.nn.Module, n: int, rank: int,
                  targets: list[str] = ALL_LINEAR) -> list[Adapter]:
    """``n`` random rank-``rank`` LoRA adapters on ``targets`` (every projection)."""
    gen = torch.Generator().manual_seed(5)
    config = LoraConfig(r=rank, lora_alpha=float(2 * rank), target_modules=targets)
    return [Adapter((Component("lora", config, lora_modules(model, config, gen)),))
            for _ in range(n)]


def sweep(args: argparse.Namespace, counts: list[int]) -> list[dict[str, object]]:
    """Decode step with LoRA on every projection over ``counts`` distinct adapters vs the
    base step, timed alternately."""
    model = build_model(args)
    base = copy.deepcopy(model)  # the unwrapped twin the base step runs on
    pool = SlotPool(model, PoolConfig(num_slots=max(counts), max_rank=args.rank,
                                      gather_budget=args.gather_budget))
    for slot, adapter in enumerate(lora_adapters(base, max(counts), args.rank)):
        pool.load(slot, adapter)
    base_step = DecodeStep(base, args.batch, args.prompt)
    step = DecodeStep(model, args.batch, args.prompt)
    rows: list[dict[str, object]] = []
    for n in counts:
        slots = [i % n for i in range(args.batch)]

        def pooled(slots: list[int] = slots) -> None:
            with pool.use(slots):
                step.run()

        ms = paired_ms({"base": base_step.run, "lora": pooled}, args.reps)
        rows.append({"method": f"lora r{args.rank} all-linear", "adapters": n,
                     "ms": ms["lora"], "base_ms": ms["base"],
                     "vs_base": ms["lora"] / ms["base"]})
    return rows


def forms(args: argparse.Namespace, counts: list[int]) -> list[dict[str, object]]:
    """Every gather-mode form of the low-rank bank on two modules of layer 0, for balanced
    and skewed slot assignments; ``pick`` is what ``choose_form`` runs."""
    model = build_model(args)
    slots_max, targets = max(max(counts), 32), ["q_proj", "gate_proj"]
    pool = SlotPool(model, PoolConfig(num_slots=slots_max, max_rank=args.rank,
                                      target_modules=targets, methods=["lora"],
                                      gather_budget=1 << 40))
    for slot, adapter in enumerate(lora_adapters(model, slots_max, args.rank, targets)):
        pool.load(slot, adapter)
    n = args.batch
    cases = {f"{u} even": [i % u for i in range(n)] for u in counts}
    for u in (9, 32):  # one slot takes the rest, u - 1 slots have one token each
        if u <= n:
            cases[f"{u} skewed"] = [0] * (n - u + 1) + list(range(1, u))
    gen = torch.Generator().manual_seed(3)
    rows: list[dict[str, object]] = []
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"):
        layer = pool.layers[path]
        bank = layer.by_kind["lowrank"]
        assert isinstance(bank, LowRankBank)
        x = torch.randn(n, layer.target.in_features, generator=gen)  # [N, in]
        h = layer.base(x)  # [N, out]
        for name, ids in cases.items():
            routing = Routing(torch.tensor(ids), slots_max, gather_budget=1 << 40)
            active = bank.active(routing)
            ms = paired_ms({
                "base": partial(layer.base, x),
                "stacked": partial(bank.apply_stacked, routing, active, h, x),
                "stacked uncached": partial(bank.apply_stacked, routing, active, h, x,
                                            cached=False),
                "segment": partial(bank.apply_segment, routing, active, h, x),
                "per-token": partial(bank.apply_per_token, routing, active, h, x)},
                args.reps, stat=min)  # best of: the forms' own cost, not the neighbours'

            rows.append({"module": path.rsplit(".", 1)[1], "case": name,
                         "U": len(active), "L": routing.segment_length(active),
                         "pick": choose_form(n, len(active), routing.segment_length(active)),
                         **{k: v * 1e3 for k, v in ms.items()}})  # us
    return rows


def hut_forms(args: argparse.Namespace, counts: list[int]) -> list[dict[str, object]]:
    """The decode step with HUT adapters (the test factories': ranks 2-5 on q, v, down)
    spread round-robin over ``counts`` slots, the Hadamard bank's forms forced (stacked,
    dense) and as its rule picks, vs the base step, timed alternately (the numbers behind
    ``tessera.adapters.banks.hadamard.DENSE_MIN_TOKENS``)."""
    model = build_model(args)
    base = copy.deepcopy(model)  # the unwrapped twin the base step runs on
    pool = SlotPool(model, PoolConfig(num_slots=max(counts), max_rank=args.rank,
                                      methods=["hut"], dense_slots=max(counts)))
    gen = torch.Generator().manual_seed(7)
    for slot in range(max(counts)):
        pool.load(slot, FACTORIES["hut"](base, gen))
    step, base_step = DecodeStep(model, args.batch, args.prompt), DecodeStep(
        base, args.batch, args.prompt)

    def forced(min_tokens: int, slots: list[int]) -> Callable[[], None]:
        def run() -> None:
            with patch.object(hadamard, "DENSE_MIN_TOKENS", min_tokens), pool.use(slots):
                step.run()
        return run

    rows: list[dict[str, object]] = []
    for n in counts:
        slots = [i % n for i in range(args.batch)]
        ms = paired_ms({"base": base_step.run, "stacked": forced(1 << 30, slots),
                        "dense": forced(1, slots),
                        "rule": forced(hadamard.DENSE_MIN_TOKENS, slots)}, args.reps)
        rows.append({"adapters": n, "tokens_per_slot": args.batch // n, "base_ms": ms["base"],
                     **{f"{k}_vs_base": ms[k] / ms["base"] for k in ("stacked", "dense",
                                                                    "rule")}})
    return rows


def hot(args: argparse.Namespace) -> list[dict[str, object]]:
    """One decode step with one LoRA adapter at 75% of the rows (the rest spread over 7
    others) and at 100%: through slots vs merged into the step (dLoRA), vs the base step,
    timed alternately on the same KV cache."""
    model = build_model(args)
    base = copy.deepcopy(model)  # the unwrapped twin the base step runs on
    adapters = lora_adapters(model, 8, args.rank)
    # 16 slots: each bank's stack cache (its own size) holds both the 8-slot stack of the
    # slots step and the 7-slot one of the merged step's other rows, as in a steady engine
    pool = SlotPool(model, PoolConfig(num_slots=16, max_rank=args.rank, methods=["lora"]))
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    merge = pool.hot_merge(pool.prepare(adapters[0]))
    step, base_step = DecodeStep(model, args.batch, args.prompt), DecodeStep(
        base, args.batch, args.prompt)

    def run(slots: list[int], flags: list[bool] | None, merged: bool) -> Callable[[], None]:
        def go() -> None:
            pool.install_hot(merge if merged else None)
            with pool.use(torch.tensor(slots), hot=flags):
                step.run()
        return go

    rows = []
    for share in (0.75, 1.0):
        picks = sorted(0 if share == 1.0 or i % 4 != 3 else 1 + (i // 4) % 7
                       for i in range(args.batch))  # adapter of each row, in the order
        # the engine packs a step: by slot (through slots), the hot rows first (merged)
        flags = [p == 0 for p in picks]
        ms = paired_ms({
            "base": base_step.run,
            "slots": run(picks, None, False),
            "merged": run([-1 if f else p for p, f in zip(picks, flags, strict=True)],
                          flags, True)}, args.reps)
        rows.append({"hot_share": share, "distinct": len(set(picks)), **ms,
                     "slots_vs_base": ms["slots"] / ms["base"],
                     "merged_vs_base": ms["merged"] / ms["base"],
                     "merged_vs_slots": ms["merged"] / ms["slots"]})
    pool.install_hot(None)
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, object]], path: str,
           line: Callable[[dict[str, Any]], str]) -> None:
    """Print the header and one line per row, then write the rows' JSON."""
    print(header(args))
    for row in rows:
        print(line(row))
    write_json(args, path, rows)


def header(args: argparse.Namespace) -> str:
    return (f"decode step, batch {args.batch}, prompt {args.prompt}, Llama-shaped "
            f"hidden {args.hidden} x {args.layers} layers, fp32 "
            f"({'F.linear' if args.unpacked else 'oneDNN packed'}), {args.threads} threads, "
            f"{platform.processor() or platform.machine()}")


def write_json(args: argparse.Namespace, default: str, rows: list[dict[str, object]]) -> None:
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "torch": torch.__version__, "rows": rows}, indent=2))


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
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="32; 64 with --sweep")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of the PEFT-compared LoRA")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--counts", default=None, help="1,8,32; 1,4,16,64 with --sweep")
    parser.add_argument("--methods", default=",".join(registry.all_names()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unpacked", action="store_true",
                        help="run the base's nn.Linear as transformers does (default: "
                             "packed for oneDNN, as the engine runs a CPU base)")
    parser.add_argument("--gather-budget", type=int, default=PoolConfig().gather_budget,
                        help="PoolConfig.gather_budget (0 = always segment mode)")
    parser.add_argument("--sweep", action="store_true",
                        help="LoRA only: step vs base over 1, 4, 16, 64 distinct adapters")
    parser.add_argument("--forms", action="store_true",
                        help="time the low-rank bank's gather-mode forms per module")
    parser.add_argument("--hut-forms", action="store_true",
                        help="HUT decode step: the Hadamard bank's stacked vs dense forms")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/decode_step[_sweep|_forms].json)")
    parser.add_argument("--long-row", action="store_true",
                        help="the KV slab's decode step with one long row beside short ones")
    parser.add_argument("--long", type=int, default=1024, help="the long row (--long-row)")
    parser.add_argument("--hot", action="store_true",
                        help="one LoRA at 75%% / 100%% of the rows: slots vs merged (dLoRA)")
    args = parser.parse_args()
    issue8 = args.sweep or args.forms or args.long_row or args.hot or args.hut_forms
    args.batch = args.batch or (64 if issue8 and not args.hut_forms else 32)
    args.counts = args.counts or ("1,4,8,16,32" if args.hut_forms else
                                  "1,4,16,64" if issue8 else "1,8,32")
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    methods = args.methods.split(",")
    if args.hot:
        report(args, hot(args), "bench/results/decode_step_hot.json", lambda row: (
            f"one adapter at {row['hot_share']:.0%} ({row['distinct']} distinct): base "
            f"{row['base']:.1f} ms, slots {row['slots']:.1f} ms "
            f"({row['slots_vs_base']:.2f}x), merged {row['merged']:.1f} ms "
            f"({row['merged_vs_base']:.2f}x; {row['merged_vs_slots']:.2f}x slots)"))
        return
    if args.hut_forms:
        report(args, hut_forms(args, counts), "bench/results/decode_step_hut_forms.json",
               lambda row: (
                   f"{row['adapters']} slots x {row['tokens_per_slot']} tokens: stacked "
                   f"{row['stacked_vs_base']:.2f}x, dense {row['dense_vs_base']:.2f}x, rule "
                   f"{row['rule_vs_base']:.2f}x the base step ({row['base_ms']:.1f} ms)"))
        return
    if args.long_row:
        from bench.long_row import long_row  # it builds on this module's model and timing
        report(args, long_row(args), "bench/results/decode_step_long_row.json", lambda row: (
            f"{args.batch} rows of {args.prompt}: {row['short_ms']:.1f} ms; "
            f"{args.batch - 1} of them beside one of {args.long}: {row['long_ms']:.1f} ms"
            f" ({row['ratio']:.2f}x) grouped by length, {row['long_plain_ms']:.1f} ms"
            f" ({row['plain_ratio']:.2f}x) as one SDPA over the longest row"))
        return
    if args.sweep:
        rows = sweep(args, counts)
        print(header(args))
        print(f"{'method':28} {'adapters':>8} {'base ms':>8} {'ms':>8} {'vs base':>8}")
        for row in rows:
            print(f"{row['method']!s:28} {row['adapters']!s:>8} {row['base_ms']:8.2f} "
                  f"{row['ms']:8.2f} {row['vs_base']:8.2f}")
        write_json(args, "bench/results/decode_step_sweep.json", rows)
        return
    if args.forms:
        rows = forms(args, counts)
        print(header(args) + "; best-of-reps microseconds per module, layer 0")
        names = ["base", "stacked", "stacked uncached", "segment", "per-token"]
        print(f"{'module':10} {'case':10} {'U':>3} {'L':>3} {'pick':>9} "
              + " ".join(f"{n:>16}" for n in names))
        for row in rows:
            print(f"{row['module']!s:10} {row['case']!s:10} {row['U']!s:>3} {row['L']!s:>3} "
                  f"{row['pick']!s:>9} " + " ".join(f"{row[n]:16.0f}" for n in names))
        write_json(args, "bench/results/decode_step_forms.json", rows)
        return

    base_model = build_model(args)
    pristine = copy.deepcopy(base_model)  # unwrapped: the base step and the adapters' source
    base_step = DecodeStep(pristine, args.batch, args.prompt)
    rows: list[dict[str, object]] = []

    pool = SlotPool(base_model, PoolConfig(num_slots=max(counts), max_rank=args.rank,
                                           max_bottleneck_dim=64,
                                           gather_budget=args.gather_budget))
    step = DecodeStep(base_model, args.batch, args.prompt)

    def timed(method: str, adapters: int, slots: list[int] | None,
              peft: Callable[[], None] | None = None) -> None:
        """One row: the step (through ``slots``; None = no plan) timed alternately with
        the base step (and PEFT's, for LoRA), so that drift hits them alike."""
        def pooled() -> None:
            if slots is None:
                step.run()
                return
            with pool.use(slots):
                step.run()

        fns: dict[str, Callable[[], object]] = {"base": base_step.run, "step": pooled}
        if peft is not None:
            fns["peft"] = peft
        ms = paired_ms(fns, args.reps)
        row: dict[str, object] = {"method": method, "adapters": adapters, "ms": ms["step"],
                                  "base_ms": ms["base"], "vs_base": ms["step"] / ms["base"]}
        if peft is not None:
            row.update(peft_ms=ms["peft"], vs_peft=ms["step"] / ms["peft"])
        rows.append(row)

    timed("base, wrapped (no plan)", 0, None)
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
            for slot in range(n):
                pool.load(slot, load_peft_dir(lora_dirs[slot]))
            timed(f"lora r{args.rank} all-linear", n, [i % n for i in range(args.batch)],
                  partial(peft_step.run, adapter_names=names))

    for method in methods:
        gen = torch.Generator().manual_seed(7)
        adapters = [FACTORIES[method](pristine, gen) for _ in range(max(counts))]
        for n in counts:
            for slot in range(n):
                pool.load(slot, adapters[slot])
            timed(method, n, [i % n for i in range(args.batch)])

    print(header(args))
    print(f"{'method':28} {'adapters':>8} {'base ms':>8} {'ms':>8} {'vs base':>8} "
          f"{'vs PEFT':>8}")
    for row in rows:
        vs_peft = f"{row['vs_peft']:.2f}" if "vs_peft" in row else "-"
        print(f"{row['method']!s:28} {row['adapters']!s:>8} {row['base_ms']:8.2f} "
              f"{row['ms']:8.2f} {row['vs_base']:8.2f} {vs_peft:>8}")
    write_json(args, "bench/results/decode_step.json", rows)


if __name__ == "__main__":
    main()
