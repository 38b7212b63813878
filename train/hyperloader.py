"""HyperLoader training: a hypernetwork and task embeddings trained multi-task, and one new
task embedding trained against a frozen hypernetwork (the paper's way to add a task).

Each step generates every task's adapter with the server's own code — the batched
generator :func:`tessera.adapters.hypernet.generate_batched` and the assembly of the
generated tensors into LoRA (attention q, v) and bottleneck (with LayerNorm) components,
:func:`tessera.adapters.methods.hyperloader.assemble` — inside the autograd graph, routes
the training copy through it and sums the tasks' completion losses (one sub-batch per
task: the same gradient as a mixed batch). Generated weights depend only on (task, layer,
position), so what the server generates from the saved hypernetwork is exactly what was
trained.

Init: the registered generator's random init (normal, std 0.02), with the heads that
produce ``lora_B`` and the bottleneck LayerNorm's weight and bias set to zero, so every
generated adapter starts as the identity (LoRA's ``B = 0``; the bottleneck adds
``LN(.) * 0 + 0``) and gradients still reach every head through those.

A new task embedding moves the generated adapters only within what the frozen
hypernetwork has learnt to generate. Measured with a hypernetwork trained on ``upper``,
``rot13`` and ``caesar`` (random built-in base): a new task that needs a skill it has (a
new dataset of upper-casing) is learnt from a random start, 100% in 300 steps; a new
skill is not (``atbash`` 0%; upper-casing under an unseen prompt tag 13-15%, 13-44% on a
base pretrained on text). The default start is the registered task whose adapter fits the
new data best (:func:`warm_start`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.artifact import load_hypernetwork, save_hypernetwork
from tessera.adapters.hypernet import (
    TASK_NAME,
    HyperLoaderConfig,
    HyperNetwork,
    Site,
    generate_batched,
    layout,
)
from tessera.adapters.method import Adapter
from tessera.adapters.methods import hyperloader as hl
from tessera.adapters.safeio import write_safetensors
from tessera.train import loop
from tessera.train.base import Base
from tessera.train.checkpoint import fingerprint_of
from tessera.train.data import Example, encode_all, load_jsonl
from tessera.train.evaluate import exact_match
from tessera.train.finetune import RunOptions, file_digest, loop_options
from tessera.train.modules import set_adapter, training_copy
from tessera.train.objective import Batches, forward_loss

log = logging.getLogger(__name__)

IDENTITY_HEADS = ("lora_B", "ln_weight", "ln_bias")  # zero at init: identity adapters


class HyperOptions(BaseModel):
    """Sizes of a new hypernetwork (``default_config`` of the generator for the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_dim: int = Field(16, ge=1)
    hidden_dim: int = Field(64, ge=1)
    projector_dim: int = Field(32, ge=1)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    bottleneck_dim: int = Field(16, ge=1)


@dataclass
class TrainedHyper:
    hypernet: HyperNetwork  # detached, with every trained task registered
    result: loop.LoopResult
    out: Path
    num_parameters: int  # trainable parameters during training


def generated_adapter(hypernet_config: HyperLoaderConfig, weights: Mapping[str, torch.Tensor],
                      z: torch.Tensor, sites: list[Site]) -> Adapter:
    """Task ``z``'s adapter, differentiable w.r.t. ``weights`` and ``z`` (the generator's
    batched path and its assembly into LoRA + bottleneck, as the server runs them)."""
    generated = list(zip(sites, generate_batched(weights, z, sites), strict=True))
    return hl.assemble(hypernet_config, generated)


def _parse_task(name: str) -> str:
    if TASK_NAME.fullmatch(name) is None:
        raise ValueError(f"task name {name!r} must match {TASK_NAME.pattern}")
    return name


class HyperObjective:
    """The sum over tasks of each task's completion loss through its generated adapter."""

    def __init__(self, base: Base, hypernet: HyperNetwork, trainable: dict[str, nn.Parameter],
                 embeddings: Mapping[str, torch.Tensor], batches: Mapping[str, Batches],
                 eval_examples: Mapping[str, list[Example]]) -> None:
        self.tokenizer = base.tokenizer
        self.config = hypernet.config
        self.sites = layout(hypernet.config, tg.discover(base.model))
        self.model = training_copy(base.model, sorted({s.target.path for s in self.sites}))
        self.trainable = trainable
        # the weights the generator reads: trained parameters where they exist, else frozen
        self.weights = {k: trainable.get(f"hypernet.{k}", v)
                        for k, v in hypernet.weights.items()}
        self.embeddings = {name: trainable.get(f"task.{name}", z)
                           for name, z in embeddings.items()}
        self.batches, self.eval_examples = batches, eval_examples

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.trainable

    def adapter(self, task: str) -> Adapter:
        return generated_adapter(self.config, self.weights, self.embeddings[task], self.sites)

    def loss(self, step: int) -> loop.StepLoss:
        total, tokens = torch.zeros(()), 0
        for task, batches in self.batches.items():
            set_adapter(self.model, self.adapter(task))
            batch = batches.batch(step)
            total = total + forward_loss(self.model, batch)
            tokens += batch.num_tokens
        total = total / len(self.batches)
        return loop.StepLoss(total, float(total.detach()), tokens)

    def evaluate(self) -> dict[str, float]:
        scores = {}
        for task, examples in self.eval_examples.items():
            with torch.no_grad():
                set_adapter(self.model, self.adapter(task))
                scores[task] = exact_match(self.model, self.tokenizer, examples).accuracy
        set_adapter(self.model, None)
        return scores


def init_hypernet(base: Base, opts: HyperOptions, seed: int) -> HyperNetwork:
    targets = tg.discover(base.model)
    config = hl.default_config(targets, **opts.model_dump())
    hypernet = hl.HYPERLOADER.init(config, targets, torch.Generator().manual_seed(seed))
    for kind in IDENTITY_HEADS:
        for part in ("weight", "bias"):
            hypernet.weights[f"heads.{kind}.{part}"].zero_()
    return hypernet


def _load_sets(files: Mapping[str, Path]) -> dict[str, list[Example]]:
    return {_parse_task(name): load_jsonl(path) for name, path in files.items()}


def _objective(base: Base, hypernet: HyperNetwork, trainable: dict[str, nn.Parameter],
               embeddings: dict[str, torch.Tensor], data: Mapping[str, Path],
               eval_files: Mapping[str, Path], run: RunOptions) -> HyperObjective:
    batches = {}
    for name, examples in _load_sets(data).items():
        encoded = encode_all(examples, base.tokenizer, max_length=base.max_length,
                             path=data[name])
        batches[name] = Batches(encoded, run.batch_size, run.seed, base.pad_id)
    return HyperObjective(base, hypernet, trainable, embeddings, batches,
                          _load_sets(eval_files))


def _run(base: Base, objective: HyperObjective, data: Mapping[str, Path], run: RunOptions,
         method: str, out: Path, settings: dict[str, Any],
         on_step: Callable[[int], None] | None) -> loop.LoopResult:
    fingerprint = fingerprint_of({
        **settings, "method": method, "base": str(base.path.resolve()),
        "run": run.model_dump(exclude={"eval_every", "checkpoint_every", "resume", "progress"}),
        "data": {k: file_digest(v) for k, v in sorted(data.items())}})
    lopts = loop_options(run, method, out, fingerprint)
    log.info("training", extra={"method": method, "tasks": sorted(objective.batches),
                                "parameters": sum(p.numel() for p in
                                                  objective.trainable.values()),
                                "steps": lopts.steps, "lr": lopts.lr})
    return loop.run(objective, lopts, on_step)


def train_hyperloader(opts: HyperOptions, run: RunOptions, base: Base,
                      data: Mapping[str, Path], out: Path,
                      eval_files: Mapping[str, Path] | None = None,
                      on_step: Callable[[int], None] | None = None) -> TrainedHyper:
    """A new hypernetwork and one embedding per task in ``data`` (task name -> JSONL),
    trained jointly; saved as a tessera hypernetwork artifact with the tasks registered."""
    if len(data) < 1:
        raise ValueError("a HyperLoader needs at least one task dataset")
    torch.manual_seed(run.seed)
    hypernet = init_hypernet(base, opts, run.seed)
    gen = torch.Generator().manual_seed(run.seed + 1)
    t = hypernet.config.task_dim
    trainable = {f"hypernet.{k}": nn.Parameter(v.clone()) for k, v in hypernet.weights.items()}
    embeddings: dict[str, torch.Tensor] = {}
    for name in sorted(data):
        z = nn.Parameter(torch.randn(t, generator=gen))  # [t]
        trainable[f"task.{_parse_task(name)}"] = z
        embeddings[name] = z
    objective = _objective(base, hypernet, trainable, embeddings, data, eval_files or {}, run)
    result = _run(base, objective, data, run, "hyperloader", out,
                  {"hyper": opts.model_dump()}, on_step)
    trained = HyperNetwork(hypernet.config,
                           {k: trainable[f"hypernet.{k}"].detach().clone()
                            for k in hypernet.weights})
    for name in sorted(data):
        trained.register_task(name, embeddings[name].detach())
    save_hypernetwork(trained, out, metadata={"trained_steps": str(result.steps),
                                              "eval": str(result.last_eval)})
    return TrainedHyper(trained, result, out,
                        sum(p.numel() for p in trainable.values()))


def warm_start(objective: HyperObjective, z: nn.Parameter,
               known: Mapping[str, torch.Tensor], seed: int) -> str:
    """Start the new embedding at the registered task whose generated adapter has the
    lowest loss on the new task's first batch (the nearest known task: the frozen
    hypernetwork generates useful adapters only near the embeddings it was trained with);
    without known tasks, from a seeded normal vector. Returns where it started."""
    if not known:
        with torch.no_grad():
            z.copy_(torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)))
        return "random"
    losses = {}
    with torch.no_grad():
        for name, embedding in known.items():
            z.copy_(embedding)
            losses[name] = float(objective.loss(0).loss)
        best = min(losses, key=lambda n: losses[n])
        z.copy_(known[best])
    return best


def train_task_embedding(run: RunOptions, base: Base, hypernet_dir: Path, task: str,
                         data: Path, out: Path, eval_file: Path | None = None,
                         on_step: Callable[[int], None] | None = None, *,
                         init: Literal["nearest", "random"] = "nearest") -> TrainedHyper:
    """One new task's embedding against the frozen hypernetwork in ``hypernet_dir``; saves
    the hypernetwork with the task registered (and ``embedding.safetensors``, what the
    server's register-task endpoint takes) into ``out``. ``init``: start at the nearest
    registered task (:func:`warm_start`) or at a seeded normal vector."""
    hypernet = load_hypernetwork(hypernet_dir)
    task = _parse_task(task)
    if task in hypernet.tasks:
        raise ValueError(f"task {task!r} is already registered in {hypernet_dir}")
    torch.manual_seed(run.seed)
    z = nn.Parameter(torch.zeros(hypernet.config.task_dim))  # [t], set by warm_start
    frozen = HyperNetwork(hypernet.config,
                          {k: v.detach().float() for k, v in hypernet.weights.items()})
    objective = _objective(base, frozen, {f"task.{task}": z}, {task: z}, {task: data},
                           {task: eval_file} if eval_file is not None else {}, run)
    start = warm_start(objective, z, hypernet.tasks if init == "nearest" else {}, run.seed)
    log.info("new task embedding starts from", extra={"task": task, "start": start})
    result = _run(base, objective, {task: data}, run, "task-embedding", out,
                  {"hypernet": file_digest(hypernet_dir / "weights.safetensors"),
                   "task": task, "init": init}, on_step)
    hypernet.register_task(task, z.detach())
    save_hypernetwork(hypernet, out, metadata={"new_task": task,
                                               "eval": str(result.last_eval)})
    (out / "embedding.safetensors").write_bytes(write_safetensors({"embedding": z.detach()}))
    return TrainedHyper(hypernet, result, out, z.numel())
