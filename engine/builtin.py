"""The built-in base model: what ``tessera serve`` runs when no model is configured.

A tiny Llama-shaped causal LM with deterministic (seeded) random weights and a byte-level
tokenizer built locally with ``tokenizers``: the 256 bytes are the vocabulary (no merges),
so any UTF-8 text round-trips exactly, plus a few special tokens and a small chat template.
It is materialised once into a directory with ``save_pretrained`` and then loaded through
the same path as any local model (:mod:`tessera.engine.model`). Nothing is ever downloaded.

The weights are random: the text it generates is noise. It exists so a fresh machine can
start the server, exercise every adapter method and run the tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Bump when anything below changes: a directory with another version is rebuilt.
BUILTIN_VERSION = "tessera-builtin-v2"
MARKER = "tessera_builtin.json"
SEED = 20240917

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES), END]

# A message is "<|role|>content<|end|>"; the prompt ends with "<|assistant|>" when the
# model is to answer. The BOS comes from the template, so chat text is encoded without
# adding special tokens again.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Shape of the model: small enough for CPU tests, big enough for every adapter method
# (head_dim 16, grouped-query attention, an MLP wider than the hidden size).
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
MAX_POSITIONS = 2048
# Wider than HF's 0.02 init: the logits spread out, so greedy text varies instead of
# repeating one byte, and adapters shift it without swamping the base.
INIT_STD = 0.2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-255 are the bytes, then the special tokens."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=MAX_POSITIONS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The model with seeded random weights; the global RNG is left untouched."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN,
                         intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=INIT_STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def default_dir() -> Path:
    return Path(user_cache_dir("tessera", appauthor=False)) / BUILTIN_VERSION


def is_materialised(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == BUILTIN_VERSION


def materialise(path: Path | None = None) -> Path:
    """Write the built-in model and tokenizer into ``path`` (once) and return it.

    Written into a sibling temporary directory and renamed into place, so a crash or a
    concurrent writer never leaves a half-written model behind."""
    path = Path(path) if path is not None else default_dir()
    if is_materialised(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": BUILTIN_VERSION, "seed": SEED}))
        if path.exists():  # a stale version (or a concurrent writer that just finished)
            if is_materialised(path):
                return path
            shutil.rmtree(path)
        os.replace(tmp, path)
        log.info("built-in model materialised", extra={"path": str(path)})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
