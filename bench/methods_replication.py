"""A small replication in the spirit of the method papers: every adapter method trained on
the demo tasks at (nearly) the same trainable-parameter budget, LoRA at two ranks.

    python -m bench.methods_replication                 # the table in docs/methods.md
    python -m bench.methods_replication --tasks upper --steps 20 --n-eval 20 \\
        --out /tmp/r.json --plot /tmp/r.png             # a quick look

Base: tessera's built-in trained model (``tessera-tiny-v1``, frozen). Every run is
``tessera train``'s code path (:func:`tessera.train.finetune.train_adapter`) with the
method's default learning rate and schedule, ``--steps`` steps of batch 32 on the task's
training split, every projection of the decoder blocks targeted, one torch thread; the
held-out exact match (:func:`tessera.train.evaluate.exact_match`, greedy) is measured
every ``--eval-every`` steps and at the end.

Budgets: every method's trainable parameters grow linearly in its size knob (LoRA/DoRA/HRA/
HUT rank, SoKA's number of Kronecker terms with the ``fixed`` rule, the bottleneck width),
so the size is read off two probes (size 1 and 2, counted on the real training setup) and
the one whose count is nearest ``--budget`` is trained (HRA: an even rank, so it starts at
the identity). The default budget is LoRA r2's count; ``--lora-ranks`` adds LoRA at other
ranks. Parameters, accuracy after N steps (per task and the mean), and the median time
per training step are printed, written as JSON (``bench/results/methods_replication.json``)
and the mean accuracy over the tasks is plotted against the steps
(``docs/img/methods_replication.png``). A measurement, not a test: whatever ordering comes
out is the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import plot
from tessera.engine import builtin
from tessera.train import tasks
from tessera.train.base import Base, load_base
from tessera.train.defaults import defaults
from tessera.train.finetune import AdapterOptions, RunOptions, prepare, train_adapter

METHODS = ("lora", "dora", "hra", "hut", "soka", "bottleneck")
SIZE_NAME = {"soka": "terms", "bottleneck": "dim"}


@dataclass(frozen=True)
class Config:
    label: str
    options: AdapterOptions
    parameters: int


def count(base: Base, options: AdapterOptions) -> int:
    """Trainable parameters of this adapter on this base (the real training setup)."""
    setup = prepare(options, base, seed=0)
    return sum(p.numel() for p in setup.trainable.parameters())


def options(method: str, size: int) -> AdapterOptions:
    extra: dict[str, Any] = {"soka_rule": "fixed"} if method == "soka" else {}
    return AdapterOptions.model_validate({"method": method, "rank": size, **extra})


def matched(base: Base, method: str, budget: int) -> Config:
    """The size of ``method`` whose parameter count is nearest ``budget``."""
    one, two = count(base, options(method, 1)), count(base, options(method, 2))
    step = two - one  # parameters per unit of size
    size = max(1, round((budget - (one - step)) / step))
    if method == "hra" and size % 2:  # odd r does not start at the identity (train/init.py)
        lower, upper = max(2, size - 1), size + 1
        size = min((lower, upper), key=lambda s: abs(one + (s - 1) * step - budget))
    chosen = options(method, size)
    return Config(f"{method} {SIZE_NAME.get(method, 'r')}{size}", chosen, count(base, chosen))


def configs(base: Base, budget: int, lora_ranks: list[int]) -> list[Config]:
    out = [Config(f"lora r{r}", options("lora", r), count(base, options("lora", r)))
           for r in lora_ranks]
    out += [matched(base, m, budget) for m in METHODS if m != "lora"]
    return out


def train_one(base: Base, config: Config, files: tasks.TaskFiles, args: argparse.Namespace,
              out: Path) -> dict[str, Any]:
    stamps: list[float] = []
    run = RunOptions(steps=args.steps, seed=args.seed, eval_every=args.eval_every,
                     progress=False)
    start = time.perf_counter()
    trained = train_adapter(config.options, run, base, files.train, out, files.eval,
                            on_step=lambda _: stamps.append(time.perf_counter()))
    durations = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    curve = [(h["step"], h["eval"]["exact_match"]) for h in trained.result.history]
    return {"accuracy": curve[-1][1], "curve": curve,
            "s_per_step": statistics.median(durations),  # robust to the evaluation steps
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["upper", "atbash", "rot13"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--budget", type=int, default=0,
                        help="trainable parameters per adapter (0: LoRA at the first "
                        "--lora-ranks rank)")
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=tasks.DEFAULT_TRAIN)
    parser.add_argument("--n-eval", type=int, default=tasks.DEFAULT_EVAL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/methods_replication.json")
    parser.add_argument("--plot", default="docs/img/methods_replication.png",
                        help="PNG of mean accuracy vs steps ('' = none; needs matplotlib)")
    parser.add_argument("--doc", default="docs/methods.md",
                        help="markdown file whose results block is rewritten ('' = none)")
    args = parser.parse_args()
    if args.plot:
        plot.check()  # before the long run, not after it
    torch.set_num_threads(args.threads)
    base = load_base(builtin.materialise(variant="trained"))
    budget = args.budget or count(base, options("lora", args.lora_ranks[0]))
    chosen = configs(base, budget, args.lora_ranks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-replication-") as tmp:
        files = tasks.write_suite(Path(tmp) / "suite", args.tasks, n_train=args.n_train,
                                  n_eval=args.n_eval)
        for config in chosen:
            row: dict[str, Any] = {"config": config.label, "method": config.options.method,
                                   "rank": config.options.rank,
                                   "parameters": config.parameters,
                                   "lr": defaults(config.options.method).lr, "tasks": {}}
            for task in args.tasks:
                got = train_one(base, config, files[task], args, Path(tmp) / "runs" /
                                f"{config.label.replace(' ', '-')}-{task}")
                row["tasks"][task] = got
                print(f"  {config.label:<16} {task:<8} {100 * got['accuracy']:6.1f}%  "
                      f"{got['s_per_step'] * 1000:6.1f} ms/step", flush=True)
            row["mean_accuracy"] = statistics.fmean(t["accuracy"] for t in row["tasks"].values())
            row["s_per_step"] = statistics.median(t["s_per_step"]
                                                  for t in row["tasks"].values())
            rows.append(row)
    report(args, budget, rows)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args: argparse.Namespace, budget: int, rows: list[dict[str, Any]]) -> None:
    machine = f"{cpu_name()}, {args.threads} torch thread(s)"
    print(f"\n{builtin.TRAINED_NAME}, {args.steps} steps x batch 32, budget {budget:,} "
          f"parameters, held-out exact match on {args.n_eval} examples per task, {machine}")
    head = f"{'adapter':<16}{'params':>9}" + "".join(f"{t:>9}" for t in args.tasks)
    print(head + f"{'mean':>8}{'ms/step':>9}")
    for row in rows:
        cells = "".join(f"{100 * row['tasks'][t]['accuracy']:>8.1f}%" for t in args.tasks)
        print(f"{row['config']:<16}{row['parameters']:>9,}{cells}"
              f"{100 * row['mean_accuracy']:>7.1f}%{row['s_per_step'] * 1000:>9.1f}")
    if args.plot:
        series = {}
        for row in rows:
            curves = [row["tasks"][t]["curve"] for t in args.tasks]
            steps = [s for s, _ in curves[0]]
            mean = [100 * statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
            series[f"{row['config']} ({row['parameters'] / 1000:.0f}k)"] = (steps, mean)
        plot.lines(Path(args.plot), f"{builtin.TRAINED_NAME}: mean held-out exact match over "
                   f"{', '.join(args.tasks)} (budget {budget:,} parameters)", series,
                   "training steps (batch 32)", "exact match (%)", ylim=(-2, 102))
    if args.doc:
        write_doc(Path(args.doc), markdown(args, budget, rows, machine))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "budget": budget, "machine": platform.platform(),
        "processor": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "base": {"name": builtin.TRAINED_NAME,
                 "sha256": builtin.trained_manifest()["sha256"]},
        "rows": rows}, indent=2) + "\n")


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def markdown(args: argparse.Namespace, budget: int, rows: list[dict[str, Any]],
             machine: str) -> str:
    """The results block of the doc: what ran, where, when, and the table."""
    command = "python -m bench.methods_replication " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out", "plot", "doc"))
    ranked = sorted(rows, key=lambda r: (-r["mean_accuracy"], r["parameters"]))
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.platform()} ({machine}), "
        f"torch {torch.__version__}, base `{builtin.TRAINED_NAME}`; budget {budget:,} "
        f"trainable parameters; {args.steps} steps of batch 32; held-out exact match on "
        f"{args.n_eval} examples per task.",
        "", "```bash", command, "```", "",
        "| adapter | parameters | lr | " + " | ".join(args.tasks) + " | mean | ms / step |",
        "|---|---:|---:|" + "---:|" * len(args.tasks) + "---:|---:|",
    ]
    for row in rows:
        cells = " | ".join(f"{100 * row['tasks'][t]['accuracy']:.1f}%" for t in args.tasks)
        lines.append(f"| {row['config']} | {row['parameters']:,} | {row['lr']:g} | {cells} | "
                     f"{100 * row['mean_accuracy']:.1f}% | {row['s_per_step'] * 1000:.0f} |")
    lines += ["", "Ordering by mean accuracy (ties: fewer parameters first): "
              + " > ".join(r["config"] for r in ranked) + ".", ""]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    """Replace the text between the results markers of ``path`` with ``block``."""
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
