"""Exact-match evaluation by greedy decoding.

A prediction is the greedy continuation of the prompt (encoded as the server encodes it,
BOS included) up to and including the first occurrence of the terminator (``"\\n"`` for
the demo tasks); a completion without the terminator is compared with exactly as many
generated tokens as it has. An example is correct when the prediction equals its
completion, character for character.

Prompts are decoded in batches of equal token length (no padding, so every row computes
exactly what a lone request would) with the model's KV cache. ``route(rows)``, when given,
is entered around each batch with the batch's example indices: a slot pool's per-row
adapter routing (``lambda rows: pool.use([slot[i] for i in rows])``) makes it a mixed
batch of adapters, as the server runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tessera.train.data import Example

TERMINATOR = "\n"


@dataclass(frozen=True)
class EvalResult:
    correct: int
    total: int
    predictions: tuple[str, ...]  # in the examples' order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _cut(text: str, terminator: str) -> str:
    at = text.find(terminator)
    return text if at < 0 else text[:at + len(terminator)]


@torch.no_grad()
def greedy(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation ids ``[B, max_new_tokens]`` of equal-length prompts ``[B, T]``."""
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache = out.cache
    token = out.logits[:, -1].argmax(dim=-1)  # [B]
    generated = [token]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=token.unsqueeze(1), cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(dim=-1)  # [B]
        generated.append(token)
    return torch.stack(generated, dim=1)  # [B, max_new_tokens]


def exact_match(model: nn.Module, tokenizer: Any, examples: Sequence[Example], *,
                terminator: str = TERMINATOR, batch_size: int = 256,
                route: Callable[[list[int]], AbstractContextManager[Any]] | None = None
                ) -> EvalResult:
    device = next(model.parameters()).device
    prompts = [list(tokenizer(e.prompt, add_special_tokens=True)["input_ids"]) for e in examples]
    lengths = [len(tokenizer(e.completion, add_special_tokens=False)["input_ids"])
               for e in examples]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    predictions = [""] * len(examples)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = torch.tensor([prompts[i] for i in chunk], device=device)  # [B, T]
            steps = max(lengths[i] for i in chunk) + 1  # one more: a missed terminator shows
            with route(chunk) if route is not None else nullcontext():
                out = greedy(model, batch, steps)  # [B, steps]
            for row, i in enumerate(chunk):
                text = tokenizer.decode(out[row].tolist(), skip_special_tokens=True)
                if examples[i].completion.endswith(terminator):
                    predictions[i] = _cut(text, terminator)
                else:
                    predictions[i] = tokenizer.decode(out[row, :lengths[i]].tolist(),
                                                      skip_special_tokens=True)
    correct = sum(p == e.completion for p, e in zip(predictions, examples, strict=True))
    return EvalResult(correct, len(examples), tuple(predictions))
