"""What one training step computes for one adapter: the completion-only cross-entropy of a
batch through the training copy (plus a method's regulariser), and the held-out exact
match the loop reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.adapters.method import Adapter
from tessera.adapters.methods.hra import HraConfig, unit_columns
from tessera.train.data import IGNORE, Batch, Encoded, Example, batch_indices, collate
from tessera.train.evaluate import exact_match
from tessera.train.loop import StepLoss
from tessera.train.modules import TrainableAdapter


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens.
    ``logits: [B, T, V]`` predicts position t + 1 from position t; ``labels: [B, T]``."""
    pred = logits[:, :-1].flatten(0, 1)  # [B (T-1), V]
    target = labels[:, 1:].flatten()  # [B (T-1)]
    return F.cross_entropy(pred, target, ignore_index=IGNORE)


def forward_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return completion_loss(logits, batch.labels)  # [B, T, V] -> []


def hra_orthogonality(adapter: Adapter) -> torch.Tensor:
    """The HRA paper's regulariser without its lambda: ``sum_modules ||I - U'^T U'||_F``
    with ``U'`` the unit columns (the directions the reflections use). Zero for modules
    trained with Gram-Schmidt, whose directions are orthonormal by construction."""
    total = torch.zeros(())
    for component in adapter.components:
        config = component.config
        if component.method != "hra" or not isinstance(config, HraConfig) or config.apply_GS:
            continue
        for tensors in component.modules.values():
            u = unit_columns(tensors["hra_u"])  # [in, r]
            gram = u.t() @ u  # [r, r]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)  # [r, r]
            total = total + torch.linalg.matrix_norm(eye - gram)  # Frobenius
    return total


@dataclass
class Batches:
    """The training examples and the deterministic order they are drawn in."""

    encoded: Sequence[Encoded]
    batch_size: int
    seed: int
    pad_id: int

    def batch(self, step: int) -> Batch:
        idx = batch_indices(len(self.encoded), self.batch_size, step, self.seed)
        return collate([self.encoded[i] for i in idx], self.pad_id)


class AdapterObjective:
    """One adapter, trained on one dataset."""

    def __init__(self, model: nn.Module, trainable: TrainableAdapter, batches: Batches,
                 tokenizer: Any, eval_examples: Sequence[Example] = (),
                 regulariser: Callable[[Adapter], torch.Tensor] | None = None,
                 reg_weight: float = 0.0) -> None:
        self.model, self.trainable, self.batches = model, trainable, batches
        self.tokenizer, self.eval_examples = tokenizer, eval_examples
        self.regulariser, self.reg_weight = regulariser, reg_weight
        self.live = trainable.adapter()  # tensors ARE the parameters

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.trainable.named_tensors()

    def loss(self, step: int) -> StepLoss:
        batch = self.batches.batch(step)
        task = forward_loss(self.model, batch)
        total = task
        if self.regulariser is not None and self.reg_weight:
            total = task + self.reg_weight * self.regulariser(self.live)
        return StepLoss(total, float(task.detach()), batch.num_tokens)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        return {"exact_match": exact_match(self.model, self.tokenizer,
                                           self.eval_examples).accuracy}
