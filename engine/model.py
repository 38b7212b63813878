"""Load the frozen base model and its tokenizer, and apply its chat template.

``trust_remote_code`` is always off; files are read locally (``local_files_only=True``)
unless the settings allow hub downloads. With no model configured, the built-in model
(:mod:`tessera.engine.builtin`) is materialised and loaded through the same path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tessera.adapters import kernels
from tessera.engine import attention, builtin
from tessera.engine.errors import RequestValidationError
from tessera.engine.settings import EngineSettings

log = logging.getLogger(__name__)

_ROLE = re.compile(r"^[a-z_]{1,32}$")


@dataclass
class LoadedModel:
    """The loaded base: model (eval, frozen), tokenizer, and what the scheduler needs."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (untyped library)
    name: str
    device: torch.device
    dtype: torch.dtype
    context_limit: int
    eos_token_ids: frozenset[int]
    max_token_bytes: int = 64  # UTF-8 bytes of the longest vocabulary entry (an upper bound)
    packed_linears: int = 0  # linear layers running oneDNN on packed weights (kernels.py)

    @property
    def layers(self) -> int:
        """Decoder layers: one KV cache layer each."""
        return int(self.model.config.num_hidden_layers)

    @property
    def max_prompt_bytes(self) -> int:
        """A prompt longer than this (UTF-8 bytes) cannot fit the context: no token covers
        more than ``max_token_bytes`` bytes of text, so it has more than ``context_limit``
        tokens. Checked before tokenizing, so a huge prompt costs nothing."""
        return self.context_limit * self.max_token_bytes

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with the tokenizer's own special tokens (BOS) added."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Chat messages -> prompt ids ending with the assistant's turn. Control tokens
        typed inside message contents are encoded as plain text, never as control tokens."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestValidationError(f"model {self.name!r} has no chat template")
        if not messages:
            raise RequestValidationError("messages must not be empty")
        clean: list[dict[str, str]] = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not _ROLE.match(role):
                raise RequestValidationError(f"messages[{i}].role {role!r} is not a valid role")
            if not isinstance(content, str):
                raise RequestValidationError(f"messages[{i}].content must be a string")
            clean.append({"role": role, "content": content})
        encoded = self.tokenizer.apply_chat_template(
            clean, add_generation_prompt=True, tokenize=True, return_dict=True,
            sanitize_control_tokens=True)
        return [int(i) for i in encoded["input_ids"]]


def model_source(settings: EngineSettings) -> str:
    """Where the model is read from: the configured directory / hub id, or the built-in
    model's directory (materialised on first use)."""
    if settings.model is None:
        return str(builtin.materialise(settings.builtin_dir))
    return settings.model


def load_base(settings: EngineSettings) -> LoadedModel:
    source = model_source(settings)
    local_only = not settings.allow_download
    if settings.model is not None and not Path(source).is_dir() and local_only:
        log.info("model is not a local directory; reading the local hub cache only",
                 extra={"model": source})
    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": local_only}
    if settings.revision is not None:
        common["revision"] = settings.revision
    device = settings.torch_device()
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=settings.torch_dtype, **common)
    model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    attention.install(model)  # packed steps (engine/attention.py)
    packed = 0
    if settings.packed_linear and kernels.supported(settings.torch_dtype, device.type):
        packed = kernels.pack_linears(model)  # before the slot pool wraps any projection
    limit = _context_limit(model, tokenizer, settings)
    eos = _eos_ids(model, tokenizer)
    log.info("base model loaded", extra={"model": source, "device": str(device),
                                         "dtype": settings.dtype, "context_limit": limit,
                                         "packed_linears": packed})
    return LoadedModel(model=model, tokenizer=tokenizer, name=settings.model or "builtin",
                     device=device, dtype=settings.torch_dtype, context_limit=limit,
                     eos_token_ids=eos, max_token_bytes=_max_token_bytes(tokenizer),
                     packed_linears=packed)


def _max_token_bytes(tokenizer: Any) -> int:
    """UTF-8 length of the longest vocabulary entry: its spelling (byte-level BPE's 'Ġ',
    SentencePiece's '▁', '<0x41>' byte tokens) is never shorter than the text it covers,
    so this bounds the bytes of text one token can stand for."""
    vocab = tokenizer.get_vocab()
    return max((len(str(token).encode("utf-8", "surrogatepass")) for token in vocab),
               default=1) or 1


def _context_limit(model: PreTrainedModel, tokenizer: Any, settings: EngineSettings) -> int:
    limits = [settings.context_limit] if settings.context_limit is not None else []
    config_limit = getattr(model.config, "max_position_embeddings", None)
    if config_limit is None:
        config_limit = getattr(model.config, "n_positions", None)
    if isinstance(config_limit, int) and config_limit > 0:
        limits.append(config_limit)
    if not limits:
        raise ValueError("the model config names no context length: set context_limit")
    budget = settings.kv_budget()  # one row of the whole context must fit the KV budget
    return min(*limits, budget.tokens // budget.block * budget.block)


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
