"""The ``tessera train`` command: argument parsing (torch-free, so ``tessera --help`` stays
fast) and the run, which imports torch and the training modules only when called.

    tessera train METHOD --data FILE --out DIR [options]    # lora dora hra hut soka bottleneck
    tessera train hyperloader --data NAME=FILE [--data NAME=FILE ...] --out DIR
    tessera train task-embedding --hypernet DIR --data NAME=FILE --out DIR

Writes the artifact into ``--out`` (PEFT folder for lora/dora/hra, tessera's format for the
rest, a hypernetwork artifact for hyperloader/task-embedding), ``training.json`` (the run's
summary) and ``checkpoint/`` (for ``--resume``); prints the summary as JSON.

``--upload URL`` then sends it to a running server (:mod:`tessera.train.upload`): an
adapter becomes a new version of ``--name`` bound to ``--task``; a HyperLoader a new
version of hypernetwork ``--name``, each of its tasks T served as the task ``PREFIX-T``
(``--task PREFIX``, default: the hypernetwork's name); a task embedding is registered on
``--hypernetwork NAME[@VERSION]`` (default: the latest version, checked to be the
``--hypernet`` it was trained against) and served as ``PREFIX-T`` (default prefix: NAME).
The upload options are checked before training starts.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.server.cli_error import CliError

ADAPTER_METHODS = ("lora", "dora", "hra", "hut", "soka", "bottleneck")
HYPER_METHODS = ("hyperloader", "task-embedding")
METHODS = (*ADAPTER_METHODS, *HYPER_METHODS)
SUMMARY_FILE = "training.json"
UPLOAD_HELP = """\
--upload URL sends the result to a running tessera server (tenant key: --key or
$TESSERA_API_KEY) and binds tasks to it:
  adapter methods  a new version of adapter NAME (--name, default: the --out directory's
                   name), activated for task --task (default: NAME)
  hyperloader      a new version of hypernetwork NAME (--name, as above) with its trained
                   tasks; each task T is served as the task PREFIX-T (--task PREFIX,
                   default: NAME)
  task-embedding   the new task T registered on the server's hypernetwork
                   --hypernetwork NAME[@VERSION] (default: its latest version, which must
                   hold the weights of --hypernet DIR), served as the task PREFIX-T
                   (--task PREFIX, default: NAME)
e.g. tessera train hyperloader --data upper=u.jsonl --data rot13=r.jsonl --out multi
     --upload URL  ->  hypernetwork "multi", tasks "multi-upper" and "multi-rot13"
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``tessera`` subcommand parsers."""
    p: argparse.ArgumentParser = commands.add_parser(
        "train", help="fine-tune an adapter of any method against a frozen base",
        description="Train one adapter (lora, dora, hra, hut, soka, bottleneck), a HyperLoader\n"
        "over several tasks, or one new task embedding against a frozen hypernetwork, on\n"
        'JSONL files of {"prompt", "completion"} lines (loss on the completion only).',
        epilog=UPLOAD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHODS)
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]FILE",
                   help="training JSONL; NAME=FILE per task for hyperloader/task-embedding")
    p.add_argument("--eval-file", action="append", default=[], metavar="[NAME=]FILE",
                   help="held-out JSONL for exact-match evaluation (NAME=FILE per task)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--base", type=Path, help="base model directory (default: built-in model)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, help="optimizer steps (default: per method)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--lr", type=float, help="peak learning rate (default: per method)")
    run.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps")
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    run.add_argument("--checkpoint-every", type=int, default=0,
                     help="steps between checkpoints (always one at the end and on Ctrl-C)")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint (same options and data required)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    shape = p.add_argument_group("adapter")
    shape.add_argument("--rank", type=int,
                       help="r; SoKA: the most Kronecker terms; bottleneck: its width; "
                       "hyperloader: the generated LoRA's rank (default 4)")
    shape.add_argument("--alpha", type=float, help="LoRA/DoRA/HUT alpha (default: 2 r)")
    shape.add_argument("--target-modules",
                       help="comma-separated module names, or a regex (default: every "
                       "projection of the decoder blocks)")
    shape.add_argument("--rslora", action="store_true", help="LoRA/DoRA: s = alpha / sqrt(r)")
    shape.add_argument("--gram-schmidt", action="store_true", help="HRA: apply_GS")
    shape.add_argument("--hra-lambda", type=float, default=1e-4,
                       help="HRA orthogonality regulariser weight (0: off)")
    shape.add_argument("--soka-rule", choices=("energy", "elbow", "fixed"), default="energy",
                       help="SoKA rank per module from the KPSVD spectrum")
    shape.add_argument("--soka-tau", type=float, default=0.5, help="SoKA energy threshold")
    shape.add_argument("--layer-norm", action="store_true", help="bottleneck: LayerNorm")
    shape.add_argument("--activation", choices=("relu", "gelu", "silu", "tanh"),
                       default="relu", help="bottleneck activation")
    hyper = p.add_argument_group("hyperloader")
    hyper.add_argument("--task-dim", type=int, default=16)
    hyper.add_argument("--hidden-dim", type=int, default=64)
    hyper.add_argument("--projector-dim", type=int, default=32)
    hyper.add_argument("--bottleneck-dim", type=int, default=16)
    hyper.add_argument("--hypernet", type=Path,
                       help="task-embedding: the trained hypernetwork artifact directory")
    hyper.add_argument("--embedding-init", choices=("nearest", "random"), default="nearest",
                       help="task-embedding: start at the registered task with the lowest "
                       "loss on the new data, or at a seeded random vector")
    up = p.add_argument_group("upload (see below)")
    up.add_argument("--upload", metavar="URL",
                    help="send the result to this server and bind tasks to it")
    up.add_argument("--key", default=os.environ.get("TESSERA_API_KEY"),
                    help="tenant API key (default: $TESSERA_API_KEY)")
    up.add_argument("--name", help="adapter or hypernetwork name on the server (default: "
                    "the output directory's name)")
    up.add_argument("--task", help="adapter methods: the task to activate (default: the "
                    "name); hyperloader, task-embedding: PREFIX, each HyperLoader task T "
                    "served as PREFIX-T (default: the hypernetwork's name)")
    up.add_argument("--hypernetwork", metavar="NAME[@VERSION]",
                    help="task-embedding: the server's hypernetwork to register the new "
                    "task on (default version: the latest)")
    return p


def named_files(values: list[str], *, named: bool) -> dict[str, Path]:
    """``NAME=FILE`` (or a bare ``FILE``, named by its stem) -> {name: path}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if named:
                raise CliError(f"{value!r}: give NAME=FILE (one per task)")
            name, path = Path(value).stem, value
        if name in out:
            raise CliError(f"task {name!r} is given twice")
        out[name] = Path(path)
    return out


def _targets(spec: str | None) -> list[str] | str | None:
    if spec is None:
        return None
    if any(c in spec for c in "^$*+?()[]|\\"):
        return spec  # a regex over the module path (PEFT's rule)
    return [s.strip() for s in spec.split(",") if s.strip()]


@dataclass(frozen=True)
class UploadPlan:
    """Where ``--upload`` sends the result: checked before training starts."""

    url: str
    key: str
    name: str  # adapter or hypernetwork name on the server
    task: str  # adapter methods: the task; HyperLoader runs: the served tasks' prefix
    version: int | None = None  # task-embedding: the hypernetwork version (None: latest)


def _hypernetwork_ref(value: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION``."""
    name, sep, version = value.partition("@")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise CliError(f"--hypernetwork {value!r}: VERSION must be a positive integer "
                       "(NAME@VERSION)")
    return name, int(version)


def upload_plan(args: argparse.Namespace) -> UploadPlan | None:
    """The upload ``args`` ask for (None: no ``--upload``), or a CliError saying what is
    missing or does not apply, with every server-side name checked."""
    from tessera.store.errors import InvalidNameError
    from tessera.store.names import check_name
    from tessera.train.upload import served_task

    if not args.upload:
        for flag in ("name", "task", "hypernetwork"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag} goes with --upload URL")
        return None
    if not args.key:
        raise CliError("--upload needs a key: pass --key or set TESSERA_API_KEY")
    if args.method == "task-embedding":
        if args.hypernetwork is None:
            raise CliError("task-embedding --upload needs --hypernetwork NAME[@VERSION]: the "
                           "server's hypernetwork to register the new task on")
        if args.name is not None:
            raise CliError("--name does not apply to task-embedding: the new task is named "
                           "by --data NAME=FILE, the hypernetwork by --hypernetwork")
        name, version = _hypernetwork_ref(args.hypernetwork)
    elif args.hypernetwork is not None:
        raise CliError("--hypernetwork applies to task-embedding only (a hyperloader "
                       "upload is named by --name)")
    else:
        name, version = args.name or args.out.resolve().name, None
    plan = UploadPlan(args.upload, args.key, name, args.task or name, version)
    kind = "hypernetwork" if args.method in HYPER_METHODS else "adapter"
    try:
        check_name(plan.name, kind)
        if args.method in HYPER_METHODS:
            for hyper_task in named_files(args.data, named=True):
                check_name(served_task(plan.task, hyper_task), "served task (PREFIX-TASK)")
        else:
            check_name(plan.task, "task")
    except InvalidNameError as exc:
        raise CliError(str(exc)) from exc
    return plan


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, export, optionally upload; the summary written to OUT/training.json."""
    from pydantic import ValidationError

    from tessera.adapters.errors import AdapterError
    from tessera.train.checkpoint import CheckpointError
    from tessera.train.data import DatasetError

    plan = upload_plan(args)
    try:
        summary = _train(args)
    except KeyboardInterrupt:
        raise CliError(f"interrupted; {args.out / 'checkpoint'} holds the last "
                       "completed step: run the same command with --resume") from None
    except (DatasetError, CheckpointError, AdapterError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    except ValidationError as exc:
        raise CliError(f"invalid option: {exc}") from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    summary_file = args.out / SUMMARY_FILE
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")  # kept if the upload fails
    if plan is not None:
        summary["upload"] = _upload(args, plan)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tessera.train import finetune, hyperloader
    from tessera.train.base import load_base
    from tessera.train.data import load_jsonl

    if args.threads:
        torch.set_num_threads(args.threads)
    run_opts = finetune.RunOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        resume=args.resume, progress=args.progress)
    multi = args.method in HYPER_METHODS
    data = named_files(args.data, named=multi)
    evals = named_files(args.eval_file, named=multi)
    if args.method in ADAPTER_METHODS and (len(data) != 1 or len(evals) > 1):
        raise CliError(f"{args.method} trains on one --data file (and one --eval-file)")
    if args.method == "task-embedding" and (args.hypernet is None or len(data) != 1):
        raise CliError("task-embedding needs --hypernet DIR and one --data NAME=FILE")
    for path in [*data.values(), *evals.values()]:
        load_jsonl(path)  # a bad line fails here, before the base is loaded
    base = load_base(args.base)
    if args.method in ADAPTER_METHODS:
        opts = finetune.AdapterOptions(
            method=args.method, rank=args.rank, alpha=args.alpha,
            target_modules=_targets(args.target_modules), rslora=args.rslora,
            apply_gs=args.gram_schmidt, hra_lambda=args.hra_lambda, soka_rule=args.soka_rule,
            soka_tau=args.soka_tau, bottleneck_layer_norm=args.layer_norm,
            bottleneck_activation=args.activation)
        trained = finetune.train_adapter(opts, run_opts, base, next(iter(data.values())),
                                         args.out, next(iter(evals.values()), None))
        result, params = trained.result, trained.num_parameters
        fmt = "peft" if args.method in ("lora", "dora", "hra") else "tessera"
    elif args.method == "hyperloader":
        hopts = hyperloader.HyperOptions(
            task_dim=args.task_dim, hidden_dim=args.hidden_dim,
            projector_dim=args.projector_dim, lora_rank=args.rank or 4,
            bottleneck_dim=args.bottleneck_dim)
        hyper = hyperloader.train_hyperloader(hopts, run_opts, base, data, args.out, evals)
        result, params, fmt = hyper.result, hyper.num_parameters, "tessera.hypernetwork"
    else:
        (task, path), = data.items()
        hyper = hyperloader.train_task_embedding(run_opts, base, args.hypernet, task, path,
                                                 args.out, evals.get(task),
                                                 init=args.embedding_init)
        result, params, fmt = hyper.result, hyper.num_parameters, "tessera.hypernetwork"
    return {"method": args.method, "out": str(args.out), "format": fmt,
            "base": str(base.path), "steps": result.steps,
            "final_loss": round(result.final_loss, 5), "eval": result.last_eval,
            "history": result.history, "trainable_parameters": params,
            "seconds": round(result.seconds, 2), "tokens_per_s": round(result.tokens_per_s)}


def _upload(args: argparse.Namespace, plan: UploadPlan) -> dict[str, Any]:
    from tessera.server.client import TesseraClient, TesseraConnectionError, TesseraError
    from tessera.train import upload

    try:
        with TesseraClient(plan.url, plan.key) as client:
            if args.method in ADAPTER_METHODS:
                done = upload.upload_and_activate(client, args.out, plan.name, plan.task)
                return {"adapter": plan.name, "version": done.version["version"],
                        "task": done.task["task"]}
            if args.method == "hyperloader":
                hyper = upload.upload_hypernetwork(client, args.out, plan.name, plan.task)
            else:
                (new_task,) = named_files(args.data, named=True)
                hyper = upload.add_task(client, args.out / upload.EMBEDDING_FILE, plan.name,
                                        plan.version, new_task, plan.task,
                                        trained_against=args.hypernet)
    except (TesseraError, TesseraConnectionError, ValueError) as exc:
        raise CliError(f"upload to {plan.url} failed: {exc}") from exc
    return {"hypernetwork": plan.name, "version": hyper.hypernetwork["version"],
            "tasks": {t: bound["task"] for t, bound in hyper.tasks.items()}}
