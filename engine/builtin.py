"""The built-in base model: what ``tessera serve`` runs when no model is configured.

A small Llama-architecture causal LM over a byte-level tokenizer built locally with
``tokenizers``: the 256 bytes are the vocabulary (no merges), so any UTF-8 text round-trips
exactly, plus a few special tokens and a small chat template. Two variants share the
tokenizer:

* ``"trained"`` (the default, what ``tessera serve`` runs): ``tessera-tiny-v1``, 1.25M
  parameters pretrained by :mod:`tessera.train.pretrain` on English documentation
  (:mod:`tessera.train.corpus`); it writes words. The weights ship with the package as
  ``assets/tessera-tiny-v1.safetensors`` (float16) beside a manifest (``.json``: shape,
  corpus hash, the command that reproduces it, held-out bits per byte, sha256).
* ``"random"``: a tiny model (hidden 64, 2 layers) with seeded random weights; its text is
  noise. The test suite's fixtures use it (fast, and the tests compare the engine against
  an independent reference, for which any weights do).

Either is materialised once into a directory with ``save_pretrained`` (float32) and then
loaded through the same path as any local model (:mod:`tessera.engine.model`). Nothing is
ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from platformdirs import user_cache_dir
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Bump when anything below (or the shipped weights) changes: a directory with another
# version is rebuilt.
BUILTIN_VERSION = "tessera-builtin-v3"
MARKER = "tessera_builtin.json"
SEED = 20240917  # the random variant's weights
ASSETS = Path(__file__).resolve().parent / "assets"
Variant = Literal["trained", "random"]
VARIANTS: tuple[Variant, ...] = ("trained", "random")
DEFAULT_VARIANT: Variant = "trained"

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

MAX_POSITIONS = 2048


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-architecture model over the byte-level vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


# The trained model: head_dim 32, grouped-query attention (2 query heads per KV head), a
# SwiGLU MLP 3x as wide as the hidden size.
TRAINED_SHAPE = Shape(hidden=128, intermediate=384, layers=6, heads=4, kv_heads=2)
TRAINED_NAME = "tessera-tiny-v1"
# The random variant (the test suite's model): small enough for CPU tests, big enough for
# every adapter method (head_dim 16, grouped-query attention, an MLP wider than hidden).
RANDOM_SHAPE = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
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


def llama_config(shape: Shape, tokenizer: PreTrainedTokenizerFast,
                 initializer_range: float = 0.02) -> LlamaConfig:
    """The Llama config of a model of this shape over the byte-level tokenizer."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden,
                       intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       max_position_embeddings=MAX_POSITIONS,
                       bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                       initializer_range=initializer_range)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The random variant: seeded random weights; the global RNG is left untouched."""
    config = llama_config(RANDOM_SHAPE, tokenizer, initializer_range=INIT_STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def trained_manifest() -> dict[str, Any]:
    """The shipped model's manifest (``assets/tessera-tiny-v1.json``)."""
    manifest: dict[str, Any] = json.loads((ASSETS / f"{TRAINED_NAME}.json").read_text())
    return manifest


def trained_weights_path() -> Path:
    return ASSETS / f"{TRAINED_NAME}.safetensors"


def load_trained(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The trained variant in float32, its file checked against the manifest's sha256."""
    manifest = trained_manifest()
    weights = trained_weights_path()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != manifest["sha256"]:
        raise ValueError(f"{weights}: sha256 {digest} is not the manifest's "
                         f"{manifest['sha256']} (a damaged install?)")
    config = llama_config(Shape(**manifest["shape"]), tokenizer)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)  # no memory, no RNG: every tensor is assigned below
    state = {name: t.float() for name, t in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def default_dir(variant: Variant | None = None) -> Path:
    variant = variant or DEFAULT_VARIANT
    name = BUILTIN_VERSION if variant == "trained" else f"{BUILTIN_VERSION}-{variant}"
    return Path(user_cache_dir("tessera", appauthor=False)) / name


def is_materialised(path: Path, variant: Variant | None = None) -> bool:
    """Whether ``path`` holds a built-in model of this version (and of ``variant``, unless
    None: any variant)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("version") == BUILTIN_VERSION
            and (variant is None or marker.get("variant") == variant))


def materialise(path: Path | None = None, variant: Variant | None = None) -> Path:
    """Write the built-in model and tokenizer into ``path`` (once) and return it; offline
    (the trained weights ship with the package).

    ``variant`` None (what the engine asks for) keeps a model of either variant already
    materialised at ``path`` — so a directory the tests filled with the random variant is
    served as such — and otherwise writes the default, ``"trained"``; a named variant
    replaces a directory holding the other one. Written into a sibling temporary
    directory and renamed into place, so a crash or a concurrent writer never leaves a
    half-written model behind."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown built-in variant {variant!r}; one of {VARIANTS}")
    path = Path(path) if path is not None else default_dir(variant)
    if is_materialised(path, variant):
        return path
    build: Variant = variant or DEFAULT_VARIANT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        marker: dict[str, Any] = {"version": BUILTIN_VERSION, "variant": build}
        if build == "trained":
            model = load_trained(tokenizer)
            marker.update(name=TRAINED_NAME, sha256=trained_manifest()["sha256"])
        else:
            model = build_model(tokenizer)
            marker.update(seed=SEED)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker))
        if path.exists():  # a stale version (or a concurrent writer that just finished)
            if is_materialised(path, variant):
                return path
            shutil.rmtree(path)
        os.replace(tmp, path)
        log.info("built-in model materialised", extra={"path": str(path), "variant": build})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
