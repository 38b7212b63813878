"""``tessera demo``: adapters of every method, served together, doing what they were
trained for.

    tessera demo [--examples N] [--concurrency C] [--data-dir DIR] [--json FILE]

Starts the server in this process on the embedded defaults (the built-in trained model,
its own redis-server on a temporary data directory unless ``--data-dir``), installs the
shipped demo adapters (``train/demo_assets/``: LoRA, DoRA, HRA, HUT, SoKA, bottleneck,
each trained on a demo task, and a HyperLoader with three tasks plus a new task's
embedding; :mod:`tessera.train.demo_build` makes them), sends every held-out example of
every served task, and of the base on every demo task, as concurrent shuffled HTTP
requests, and prints per task the exact match of the base, of the adapter as measured
in-process when it was built, and as served — plus how mixed the server's batches were
(distinct adapters and methods per forward, from the engine's step reports, and the
``tessera_batch_distinct_adapters`` histogram of ``/metrics``).

Argument parsing is torch-free (``tessera --help`` stays fast); :func:`run` imports the
rest.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tessera.server.cli_error import CliError

if TYPE_CHECKING:
    from tessera.train.demo_client import Score, Served
    from tessera.train.demo_suite import DemoManifest


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``tessera`` subcommand parsers."""
    p: argparse.ArgumentParser = commands.add_parser(
        "demo", help="serve demo adapters of every method together and score them",
        description="Start tessera on the built-in model with its own redis-server, install "
        "demo adapters of every method (and a HyperLoader), send concurrent mixed requests "
        "over HTTP and print each task's exact-match accuracy, base vs adapter, and how "
        "many adapters and methods shared each batch.")
    p.add_argument("--examples", type=int,
                   help="held-out examples per task (default: all 200, the set the "
                   "in-process figures were measured on)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--data-dir", type=Path,
                   help="the store's data directory (default: a temporary one, removed)")
    p.add_argument("--redis-url", help="use this Redis instead of an embedded redis-server")
    p.add_argument("--port", type=int, help="loopback port (default: a free one)")
    p.add_argument("--num-slots", type=int, default=16, help="adapters resident at once")
    p.add_argument("--builtin-dir", type=Path,
                   help="where the built-in model is written (default: the user cache)")
    p.add_argument("--assets", type=Path, help="demo adapters (default: the shipped ones)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    return p


def _check(args: argparse.Namespace, manifest: DemoManifest) -> None:
    from tessera.engine import builtin

    if args.examples is not None and not 1 <= args.examples <= manifest.n_eval:
        raise CliError(f"--examples must be in [1, {manifest.n_eval}]")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    shipped = builtin.trained_manifest()["sha256"]
    if shipped != manifest.base.sha256:
        raise CliError(f"the demo adapters were trained on {manifest.base.name} sha256 "
                        f"{manifest.base.sha256[:12]}…, the built-in model is now "
                        f"{shipped[:12]}…; rebuild them: {manifest.command}")
    if args.redis_url is None and shutil.which("redis-server") is None:
        raise CliError("redis-server is not installed (sudo apt-get install redis-server, "
                        "brew install redis), or pass --redis-url")


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> dict[str, Any]:
    """The whole demo; prints the table on ``out`` and returns the results."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from tessera.server.logs import configure_logging
    from tessera.train import demo_client
    from tessera.train.demo_server import DemoServer, demo_settings
    from tessera.train.demo_suite import ASSETS, load_manifest

    configure_logging("warning", json_format=False)
    assets = args.assets or ASSETS
    try:
        manifest = load_manifest(assets)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    _check(args, manifest)
    started = time.perf_counter()
    admin_key = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        data_dir = args.data_dir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="tessera-demo-")))
        settings = demo_settings(data_dir, admin_key, redis_url=args.redis_url,
                                 num_slots=args.num_slots,
                                 engine={"builtin_dir": args.builtin_dir})
        _say(f"starting tessera on the built-in {manifest.base.name} (data: {data_dir}) …")
        server = stack.enter_context(DemoServer(settings, args.port))
        key, served = demo_client.install(server.url, admin_key, manifest, assets)
        hyper_tasks = sum(s.label == "hyperloader" for s in served)
        _say(f"{server.url}: installed {len(manifest.adapters)} adapters and a HyperLoader "
             f"({hyper_tasks} tasks"
             + (", one a new task embedding)" if manifest.hyperloader.new_task else ")"))
        batches = server.record_batches({s.task: s.label for s in served})
        jobs = demo_client.jobs_for(served, manifest, args.examples)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        bar = stack.enter_context(tqdm(total=len(jobs), desc="requests", unit="req",
                                       file=sys.stderr, disable=not show))
        t0 = time.perf_counter()
        scores = demo_client.score(server.url, key, jobs, concurrency=args.concurrency,
                                   on_done=lambda: bar.update(1))
        seconds = time.perf_counter() - t0
        bar.close()
        metrics = server.metrics()
    results = _results(manifest, served, scores, batches.summary(), metrics,
                       examples=args.examples or manifest.n_eval, requests=len(jobs),
                       seconds=seconds,
                       total_seconds=time.perf_counter() - started)
    out.write(table(results))
    out.flush()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _results(manifest: DemoManifest, served: list[Served], scores: list[Score],
             batches: dict[str, Any], metrics: dict[str, float], *, examples: int,
             requests: int, seconds: float, total_seconds: float) -> dict[str, Any]:
    by_task = {(s.served.task, s.served.demo_task): s for s in scores}
    base = {d: s.accuracy for (t, d), s in by_task.items() if t == "base"}
    params = {a.served_task: a.parameters for a in manifest.adapters}
    hyper = manifest.hyperloader
    rows = []
    for s in served:
        if s.label == "base":
            continue
        got = by_task[(s.task, s.demo_task)]
        new = hyper.new_task is not None and s.label == "hyperloader" \
            and s.demo_task == hyper.new_task.task
        rows.append({"demo_task": s.demo_task, "task": s.task, "method": s.label,
                     "parameters": params.get(s.task, hyper.parameters),
                     "note": f"new task embedding, {hyper.options.get('task_dim')} trained "
                     "parameters: a new dataset of a learned skill" if new else
                     "shared hypernetwork" if s.label == "hyperloader" else "",
                     "base": base[s.demo_task], "in_process": s.expected,
                     "served": got.accuracy, "correct": got.correct, "total": got.total})
    count = metrics.get("count", 0.0)
    return {"model": manifest.base.name, "examples": examples, "n_eval": manifest.n_eval,
            "requests": requests,
            "seconds": round(seconds, 2), "total_seconds": round(total_seconds, 2),
            "rows": rows, "batches": batches,
            "metrics": {"steps": int(count),
                        "distinct_adapters_mean": round(metrics.get("sum", 0.0) / count, 2)
                        if count else 0.0}}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(results: dict[str, Any]) -> str:
    """The per-task table and the batch summary, as printed."""
    head = ("demo task", "served as", "method", "params", "base", "in-process", "served")
    lines = [head]
    for r in results["rows"]:
        lines.append((r["demo_task"], r["task"], r["method"], f"{r['parameters']:,}",
                      _pct(r["base"]), _pct(r["in_process"]), _pct(r["served"])
                      + (f"  ({r['note']})" if r["note"] else "")))
    widths = [max(len(line[i]) for line in lines[:]) for i in range(len(head) - 1)]
    text = [f"\ntessera demo: {results['model']} (built-in), {len(results['rows'])} adapter "
            f"tasks + base, {results['requests']:,} requests over HTTP in "
            f"{results['seconds']:.1f} s ({results['requests'] / results['seconds']:.0f} "
            "req/s)\n"]
    for line in lines:
        text.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
                    + "  " + line[-1])
    b, m = results["batches"], results["metrics"]
    text += [
        "",
        f"base, served: exact match on {results['examples']} held-out examples per task, "
        "greedy, over HTTP;",
        f"in-process: the training code's exact match on all {results['n_eval']}, measured "
        "when the adapters were built.",
        "",
        f"batches: {b['steps']:,} forward steps, {b['rows_mean']} rows each on average",
        f"  distinct adapters per forward: mean {b['adapters_mean']}, max {b['adapters_max']}",
        f"  distinct methods per forward:  mean {b['methods_mean']}, max {b['methods_max']} "
        f"(of {', '.join(b['methods_seen'])})",
        f"  forwards mixing two or more methods: {100 * b['mixed_method_share']:.0f}%",
        f"  /metrics tessera_batch_distinct_adapters: {m['steps']:,} forwards, mean "
        f"{m['distinct_adapters_mean']}",
        f"total {results['total_seconds']:.1f} s (server start, uploads, requests)",
        "",
    ]
    return "\n".join(text)
