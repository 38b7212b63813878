"""Training data: JSONL files of ``{"prompt", "completion"}`` pairs, tokenized and batched.

Every line is one JSON object with exactly two string fields, ``prompt`` and
``completion`` (the completion non-empty); blank lines are skipped. A bad line is refused
with :class:`DatasetError`, which names the file, the line number and the field.

Tokenization matches what the server does at inference: the prompt is encoded *with* the
tokenizer's special tokens (BOS, as :meth:`tessera.engine.model.LoadedModel.encode`), the
completion without, and the two id lists are concatenated. The loss is taken on the
completion's tokens only (prompt and padding labels are ``IGNORE``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FIELDS = ("prompt", "completion")
IGNORE = -100  # label of positions that carry no loss (cross_entropy's ignore_index)


class DatasetError(ValueError):
    """A dataset file or line that cannot be used; the message names where and what."""

    def __init__(self, message: str, *, path: Path, line: int | None = None,
                 field: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field {field!r}:" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    line: int = 0  # where it came from (1-based; 0 = built in code)


def parse_line(text: str, *, path: Path, line: int) -> Example:
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})",
                           path=path, line=line) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"expected a JSON object with fields {list(FIELDS)}, got "
                           f"{type(obj).__name__}", path=path, line=line)
    for key in obj:
        if key not in FIELDS:
            raise DatasetError(f"unexpected field (expected only {list(FIELDS)})",
                               path=path, line=line, field=key)
    for key in FIELDS:
        if key not in obj:
            raise DatasetError("missing", path=path, line=line, field=key)
        if not isinstance(obj[key], str):
            raise DatasetError(f"must be a string, got {type(obj[key]).__name__}",
                               path=path, line=line, field=key)
    if not obj["completion"]:
        raise DatasetError("is empty: there is nothing to learn", path=path, line=line,
                           field="completion")
    return Example(obj["prompt"], obj["completion"], line)


def load_jsonl(path: Path) -> list[Example]:
    """Every example of a JSONL file (see the module docstring for the rules)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc.strerror}", path=path) from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"not UTF-8 (byte {exc.start + 1})", path=path,
                               line=number) from None
        if text.strip():
            examples.append(parse_line(text, path=path, line=number))
    if not examples:
        raise DatasetError("holds no examples", path=path)
    return examples


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: prompt then completion ids."""

    ids: tuple[int, ...]
    prompt_len: int  # how many leading ids belong to the prompt (no loss)


def encode(example: Example, tokenizer: Any) -> Encoded:
    prompt = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    return Encoded(tuple(int(i) for i in prompt + completion), len(prompt))


def encode_all(examples: Sequence[Example], tokenizer: Any, *, max_length: int,
               path: Path) -> list[Encoded]:
    out = []
    for example in examples:
        enc = encode(example, tokenizer)
        if len(enc.ids) > max_length:
            raise DatasetError(f"prompt + completion are {len(enc.ids)} tokens, more than "
                               f"the {max_length} allowed", path=path, line=example.line)
        if enc.prompt_len == len(enc.ids):
            raise DatasetError("encodes to no tokens", path=path, line=example.line,
                               field="completion")
        out.append(enc)
    return out


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    labels: torch.Tensor  # [B, T], IGNORE on prompt and padding

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-padded batch; each row's labels are its own ids on the completion."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(items), width, dtype=torch.long)  # [B, T]
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)  # [B, T]
    for row, enc in enumerate(items):
        n = len(enc.ids)
        ids[row, :n] = torch.tensor(enc.ids)
        mask[row, :n] = 1
        labels[row, enc.prompt_len:n] = ids[row, enc.prompt_len:n]
    return Batch(ids, mask, labels)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of training step ``step`` (0-based): epochs of seeded
    permutations, so a run's data order is a pure function of (seed, step) and a resumed
    run sees exactly the batches the uninterrupted one would have seen."""
    per_epoch = max(1, n // batch_size)  # a short last batch is dropped
    epoch, index = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)  # [n]
    size = min(batch_size, n)
    return [int(i) for i in order[index * size:(index + 1) * size]]
