"""``tessera train`` for one adapter: options -> config -> init -> training loop -> export.

The method's config is built with the registered method's own parser, the initial tensors
follow its schema (:mod:`tessera.train.init`), the forward is the method's reference
(:mod:`tessera.train.modules`) and the export is what the server loads
(:mod:`tessera.train.export`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tessera.adapters import registry
from tessera.adapters import targets as tg
from tessera.adapters.kpsvd import export_delta
from tessera.adapters.method import Adapter, Component, MethodConfig
from tessera.train import loop
from tessera.train.base import Base
from tessera.train.checkpoint import fingerprint_of
from tessera.train.data import Example, encode_all, load_jsonl
from tessera.train.defaults import default_targets, defaults
from tessera.train.export import export_adapter
from tessera.train.init import SokaStart, initial_tensors, install_residual, soka_start
from tessera.train.modules import TrainableAdapter, set_adapter, training_copy
from tessera.train.objective import AdapterObjective, Batches, hra_orthogonality

log = logging.getLogger(__name__)

AdapterMethod = Literal["lora", "dora", "hra", "hut", "soka", "bottleneck"]
METHODS: tuple[AdapterMethod, ...] = ("lora", "dora", "hra", "hut", "soka", "bottleneck")
CHECKPOINT_DIR = "checkpoint"


class RunOptions(BaseModel):
    """How long and how to train (shared by every objective)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, description="optimizer steps (default: per method)")
    batch_size: int = Field(32, ge=1)
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: per method)")
    warmup_steps: int | None = Field(None, ge=0, description="default: 5% of the steps")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    resume: bool = False
    progress: bool | None = None


class AdapterOptions(BaseModel):
    """The adapter to train: method and its shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: AdapterMethod
    rank: int | None = Field(None, ge=1, description="r / SoKA max terms / bottleneck width")
    alpha: float | None = Field(None, gt=0, description="LoRA/DoRA/HUT alpha (default 2 r)")
    target_modules: list[str] | str | None = None
    rslora: bool = False
    apply_gs: bool = False
    hra_lambda: float = Field(1e-4, ge=0, description="HRA orthogonality weight")
    soka_rule: Literal["energy", "elbow", "fixed"] = "energy"
    soka_tau: float = Field(0.5, gt=0, le=1)
    bottleneck_layer_norm: bool = False
    bottleneck_activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


@dataclass
class TrainedAdapter:
    adapter: Adapter  # what is served: terms against the ORIGINAL base, fp32
    result: loop.LoopResult
    out: Path
    num_parameters: int  # trainable parameters during training


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def build_config(opts: AdapterOptions, base: Base) -> MethodConfig:
    """The method config, validated by the registered method (not used for SoKA, whose
    config comes from its KPSVD init)."""
    rank = opts.rank or defaults(opts.method).rank
    available = tg.discover(base.model)
    targets = opts.target_modules or default_targets({t.name for t in available.values()})
    alpha = opts.alpha if opts.alpha is not None else 2.0 * rank
    raw: dict[str, Any]
    if opts.method in ("lora", "dora"):
        raw = {"r": rank, "lora_alpha": alpha, "target_modules": targets,
               "use_rslora": opts.rslora}
    elif opts.method == "hra":
        raw = {"r": rank, "apply_GS": opts.apply_gs, "target_modules": targets}
    elif opts.method == "hut":
        raw = {"r": rank, "alpha": alpha, "target_modules": targets}
    elif opts.method == "bottleneck":
        raw = {"dim": rank, "activation": opts.bottleneck_activation,
               "layer_norm": opts.bottleneck_layer_norm, "target_modules": targets}
    else:
        raise ValueError(f"{opts.method}: the config comes from its init")
    config: MethodConfig = registry.get(opts.method).parse_config(raw)
    return config


def loop_options(run: RunOptions, method: str, out: Path, fingerprint: str) -> loop.LoopOptions:
    d = defaults(method)
    steps = run.steps or d.steps
    warmup = run.warmup_steps if run.warmup_steps is not None else max(1, steps // 20)
    return loop.LoopOptions(
        steps=steps, lr=run.lr or d.lr, warmup_steps=min(warmup, steps),
        weight_decay=run.weight_decay, grad_clip=run.grad_clip, eval_every=run.eval_every,
        checkpoint_every=run.checkpoint_every, checkpoint_dir=out / CHECKPOINT_DIR,
        resume=run.resume, progress=run.progress, fingerprint=fingerprint)


def _fingerprint(opts: AdapterOptions, run: RunOptions, base: Base, data: Path) -> str:
    trajectory = run.model_dump(exclude={"eval_every", "checkpoint_every", "resume",
                                         "progress"})
    return fingerprint_of({"adapter": opts.model_dump(), "run": trajectory,
                           "base": str(base.path.resolve()), "data": file_digest(data)})


def train_adapter(opts: AdapterOptions, run: RunOptions, base: Base, data: Path, out: Path,
                  eval_file: Path | None = None,
                  on_step: Callable[[int], None] | None = None) -> TrainedAdapter:
    """Train one adapter on ``data`` and write its artifact into ``out``; ``on_step(n)``
    runs after each completed step (see :func:`tessera.train.loop.run`)."""
    train_examples = load_jsonl(data)
    eval_examples: list[Example] = load_jsonl(eval_file) if eval_file is not None else []
    encoded = encode_all(train_examples, base.tokenizer, max_length=base.max_length,
                         path=data)
    torch.manual_seed(run.seed)
    setup = prepare(opts, base, run.seed)
    objective = AdapterObjective(
        setup.model, setup.trainable, Batches(encoded, run.batch_size, run.seed, base.pad_id),
        base.tokenizer, eval_examples,
        regulariser=hra_orthogonality if opts.method == "hra" else None,
        reg_weight=opts.hra_lambda)
    fingerprint = _fingerprint(opts, run, base, data)
    lopts = loop_options(run, opts.method, out, fingerprint)
    n_params = sum(p.numel() for p in setup.trainable.parameters())
    log.info("training", extra={"method": opts.method, "parameters": n_params,
                                "examples": len(encoded), "steps": lopts.steps,
                                "lr": lopts.lr})
    result = loop.run(objective, lopts, on_step)
    served = servable(setup.trainable.frozen(), setup.start)
    export_adapter(served, out, base, metadata={
        "trained_steps": str(lopts.steps), "seed": str(run.seed),
        "eval": str(result.last_eval)})
    return TrainedAdapter(served, result, out, n_params)


@dataclass
class Setup:
    """A run's starting point: the training copy routed through the trainable adapter."""

    model: nn.Module  # frozen private copy of the base (SoKA: its W0 is W0 - init)
    trainable: TrainableAdapter
    start: SokaStart | None  # SoKA's KPSVD init (the delta export needs it)


def prepare(opts: AdapterOptions, base: Base, seed: int) -> Setup:
    """Config, initial tensors and the training copy (identity at step 0 where the method
    allows, see :mod:`tessera.train.init`)."""
    gen = torch.Generator().manual_seed(seed)
    start: SokaStart | None = None
    if opts.method == "soka":
        available = tg.discover(base.model)
        targets = opts.target_modules or default_targets({t.name for t in available.values()})
        rank = opts.rank or defaults("soka").rank
        start = soka_start(base.model, targets, rule=opts.soka_rule, tau=opts.soka_tau,
                           fixed_rank=rank, max_rank=rank)
        config, tensors = start.init.config, dict(start.init.modules)
    else:
        config = build_config(opts, base)
        tensors = dict(initial_tensors(opts.method, config, base.model, gen))
    model = training_copy(base.model, list(tensors))
    if start is not None:
        install_residual(model, start.residual)  # PiSSA-like: W0 - init, frozen
    trainable = TrainableAdapter([(opts.method, config, tensors)])
    set_adapter(model, trainable.adapter())
    return Setup(model, trainable, start)


def servable(trained: Adapter, start: SokaStart | None) -> Adapter:
    """The adapter as served on the frozen ORIGINAL base (SoKA: the delta export)."""
    if start is None:
        return trained
    (component,) = trained.components
    delta: Component = export_delta(start.init, component, compress=True)
    return Adapter((delta,))
