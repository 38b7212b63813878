"""The training loop shared by every objective (one adapter, a HyperLoader, a task embedding).

AdamW on the objective's parameters, linear warm-up then cosine decay to
``min_lr_ratio * lr`` (a pure function of the step), gradient clipping, periodic
evaluation, checkpoints every ``checkpoint_every`` steps and on Ctrl-C, ``resume`` from
the last checkpoint. A progress bar (tqdm, on stderr) shows the loss and tokens/s when
stderr is a terminal or ``progress`` is set; otherwise progress goes to the log.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

from tessera.train import checkpoint as ck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepLoss:
    loss: torch.Tensor  # [] the value to minimise (task loss + any regulariser)
    task_loss: float  # the cross-entropy part, for display
    tokens: int  # tokens the forward processed (tokens/s)


class Objective(Protocol):
    def named_parameters(self) -> dict[str, nn.Parameter]: ...

    def loss(self, step: int) -> StepLoss: ...

    def evaluate(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class LoopOptions:
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    fingerprint: str = ""


@dataclass
class LoopResult:
    steps: int
    final_loss: float
    seconds: float  # this run's wall time (a resumed run: since the resume)
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations

    @property
    def last_eval(self) -> dict[str, float]:
        return dict(self.history[-1]["eval"]) if self.history else {}


def learning_rate(step: int, opts: LoopOptions) -> float:
    """Warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr``."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    progress = min(1.0, (step - opts.warmup_steps) / span)
    floor = opts.min_lr_ratio
    return opts.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _show_progress(opts: LoopOptions) -> bool:
    return opts.progress if opts.progress is not None else sys.stderr.isatty()


def _state(step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
           opts: LoopOptions, history: list[dict[str, Any]]) -> ck.Checkpoint:
    return ck.Checkpoint(step=step, params={k: p.detach().clone() for k, p in params.items()},
                         optimizer=optimizer.state_dict(), rng=torch.get_rng_state(),
                         fingerprint=opts.fingerprint, history=list(history))


def _restore(ckpt: ck.Checkpoint, params: dict[str, nn.Parameter],
             optimizer: torch.optim.Optimizer) -> None:
    if set(ckpt.params) != set(params):
        raise ck.CheckpointError("the checkpoint holds other tensors than this run trains")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.params[name])
    optimizer.load_state_dict(ckpt.optimizer)
    torch.set_rng_state(ckpt.rng)


@contextmanager
def deferred_interrupt() -> Iterator[list[bool]]:
    """Ctrl-C sets a flag the loop checks between steps (a step is never cut in half: the
    checkpoint then matches a step boundary); a second Ctrl-C interrupts at once."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run(objective: Objective, opts: LoopOptions,
        on_step: Callable[[int], None] | None = None) -> LoopResult:
    """Train for ``opts.steps`` steps (counting those of a resumed checkpoint).
    ``on_step(step)`` runs after each completed step (and its checkpoint)."""
    params = objective.named_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=opts.lr,
                                  weight_decay=opts.weight_decay, foreach=False)
    start, history = 0, []
    ckpt_dir = opts.checkpoint_dir
    if opts.resume and ckpt_dir is not None and ck.exists(ckpt_dir):
        ckpt = ck.load(ckpt_dir, opts.fingerprint)
        _restore(ckpt, params, optimizer)
        start, history = ckpt.step, ckpt.history
        log.info("resumed from checkpoint", extra={"step": start, "dir": str(ckpt_dir)})

    def save(step: int) -> None:
        if ckpt_dir is not None:
            ck.save(ckpt_dir, _state(step, params, optimizer, opts, history))

    def evaluate(step: int) -> None:
        scores = objective.evaluate()
        if not scores:
            return
        history.append({"step": step, "eval": scores})
        if bar is not None:  # a log line on the terminal would tear the bar
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        else:
            log.info("evaluation", extra={"step": step, "eval": scores})

    bar = tqdm(total=opts.steps, initial=start, file=sys.stderr, dynamic_ncols=True,
               desc="training", unit="step") if _show_progress(opts) else None
    t0 = time.perf_counter()
    tokens, smoothed, completed = 0, float("nan"), start
    try:
        with deferred_interrupt() as stop:
            for step in range(start, opts.steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, opts)
                out = objective.loss(step)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()  # type: ignore[no-untyped-call]
                if opts.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), opts.grad_clip)
                optimizer.step()
                completed = step + 1
                tokens += out.tokens
                smoothed = (out.task_loss if math.isnan(smoothed)
                            else 0.9 * smoothed + 0.1 * out.task_loss)
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{smoothed:.4f}", tok_s=f"{rate:,.0f}")
                elif completed % max(1, opts.steps // 10) == 0:
                    log.info("training", extra={"step": completed, "loss": round(smoothed, 5),
                                                "tokens_per_s": round(rate)})
                if opts.eval_every and completed % opts.eval_every == 0 \
                        and completed < opts.steps:
                    evaluate(completed)
                if opts.checkpoint_every and completed % opts.checkpoint_every == 0:
                    save(completed)
                if on_step is not None:
                    on_step(completed)
                if stop[0]:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        save(completed)  # `completed` whole steps: the checkpoint resumes exactly there
        if bar is not None:
            bar.close()
        log.warning("interrupted; checkpoint saved", extra={"step": completed})
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    evaluate(opts.steps)
    save(opts.steps)
    return LoopResult(steps=opts.steps, final_loss=smoothed, seconds=seconds,
                      tokens_per_s=tokens / max(seconds, 1e-9), history=history)
