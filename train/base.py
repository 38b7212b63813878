"""The frozen base a training run adapts: a local Hugging Face causal LM directory, by
default tessera's built-in model (:func:`tessera.engine.builtin.materialise`).

Loaded as the server loads it (:mod:`tessera.engine.model`): local files only, no
``trust_remote_code``, safetensors weights; always fp32 for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


@dataclass
class Base:
    model: PreTrainedModel  # eval mode, requires_grad False, fp32
    tokenizer: Any  # a transformers tokenizer (untyped library)
    path: Path

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    @property
    def max_length(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) else 1024


def base_dir(path: Path | str | None) -> Path:
    if path is not None:
        return Path(path)
    from tessera.engine import builtin

    return builtin.materialise()


def load_base(path: Path | str | None = None) -> Base:
    directory = base_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"--base {directory}: not a model directory")
    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(directory, **common)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 use_safetensors=True, **common)
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    return Base(model, tokenizer, directory)
