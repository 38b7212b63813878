"""Read adapters exactly as ``peft``'s ``save_pretrained`` writes them.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Keys are
``base_model.model.<module path>.<tensor>`` with the adapter name stripped (checked against
``peft`` 0.21 output)::

    LoRA / rsLoRA   ...<path>.lora_A.weight [r, in]   ...<path>.lora_B.weight [out, r]
    DoRA            the LoRA keys plus ...<path>.lora_magnitude_vector [out]
    HRA             ...<path>.hra_u [in, r]

For GPT-2's Conv1D (``fan_in_fan_out=True``) PEFT still stores ``lora_A``/``lora_B`` in the
Linear shapes above and DoRA's magnitude per output feature; only the base weight is
transposed, so nothing is transposed here. ``use_dora`` selects method ``"dora"``,
``peft_type`` ``"HRA"`` method ``"hra"``.

Weights are decoded only through :func:`tessera.adapters.safeio.read_safetensors`; pickle files are
refused (``UnsafeFormatError``). Artifacts that cannot run on a shared frozen base are refused
with ``UnsupportedAdapterError``: inits that rewrite W0 and were not converted on save
(PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, KaSA), ``modules_to_save``, trainable biases,
``layers_to_transform`` / ``layers_pattern`` / ``exclude_modules``, and LoRA variants with
another forward. Numeric fields are bounded by the method configs' shared types
(:mod:`tessera.adapters.method`): ``"lora_alpha": Infinity`` (which ``json`` parses) or ``1e38`` is
refused naming the field, as are ``rank_pattern`` / ``alpha_pattern`` values and an
out-of-range ``lora_dropout`` (unused when serving, still checked). Checking the tensors
against a base model is left to the slot pool (:mod:`tessera.adapters.validation`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from tessera.adapters import registry
from tessera.adapters.errors import (
    AdapterValidationError,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from tessera.adapters.method import Adapter, Component, MethodConfig, Probability
from tessera.adapters.safeio import UNSAFE_SUFFIXES, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# key suffix -> tessera tensor name, per method
_SUFFIXES: dict[str, dict[str, str]] = {
    "lora": {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"},
    "dora": {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
             # PEFT strips the DoRA layer's ".weight" on save (LoraModel._get_adapter_state_dict)
             ".lora_magnitude_vector": "lora_magnitude_vector"},
    "hra": {".hra_u": "hra_u"},
}
# init_lora_weights values whose adapter is a delta against a *modified* W0 (PEFT mutates
# the base at init); ``save_pretrained(path_initial_model_for_weight_conversion=...)``
# converts them and then writes ``init_lora_weights: true``.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoRA options that change the forward or the base beyond ``W0 + s B A``: must be unset.
_LORA_UNSUPPORTED = ("lora_bias", "use_qalora", "alora_invocation_tokens", "layer_replication",
                     "trainable_token_indices", "target_parameters", "use_bdlora",
                     "arrow_config", "kasa_config", "monteclora_config")
_COMMON_UNSUPPORTED = ("layers_to_transform", "layers_pattern", "exclude_modules")
_DROPOUT = TypeAdapter(Probability)


def load_peft_dir(path: str | Path) -> Adapter:
    """An :class:`Adapter` from a folder written by ``PeftModel.save_pretrained``."""
    directory = Path(path)
    config_file = directory / CONFIG_NAME
    weights_file = directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterValidationError(f"no {CONFIG_NAME} in {directory}", tensor=CONFIG_NAME)
    if not weights_file.is_file():
        unsafe = sorted(p.name for p in directory.iterdir()
                        if p.name.lower().endswith(UNSAFE_SUFFIXES))
        if unsafe:
            raise UnsafeFormatError(f"{unsafe[0]}: pickle-based weight files are refused and "
                                    f"were not loaded; save with safe_serialization=True")
        raise AdapterValidationError(f"no {WEIGHTS_NAME} in {directory}", tensor=WEIGHTS_NAME)
    return load_peft(config_file.read_bytes(), weights_file.read_bytes())


def load_peft(config_json: bytes | str | Mapping[str, Any], weights: bytes) -> Adapter:
    """An :class:`Adapter` from the two files' contents (what an upload carries)."""
    method, config = parse_peft_config(config_json)
    tensors, _ = read_safetensors(weights, what=WEIGHTS_NAME)
    modules = split_keys(method, tensors)
    return Adapter((Component(method, config, modules),))


def parse_peft_config(config_json: bytes | str | Mapping[str, Any]
                      ) -> tuple[str, MethodConfig]:
    """``(method name, validated tessera config)`` from ``adapter_config.json``."""
    raw = _as_dict(config_json)
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterValidationError("missing or not a string", tensor="config.peft_type")
    _refuse_common(raw)
    if peft_type == "LORA":
        _refuse_lora(raw)
        _check_dropout(raw)
        method = "dora" if _flag(raw, "use_dora") else "lora"
        _flag(raw, "fan_in_fan_out")  # layout of the base only; checked for type
        fields = {"r": raw.get("r", 8), "lora_alpha": raw.get("lora_alpha", 8),
                  "target_modules": raw.get("target_modules"),
                  "use_rslora": raw.get("use_rslora", False),
                  "rank_pattern": raw.get("rank_pattern") or {},
                  "alpha_pattern": raw.get("alpha_pattern") or {}}
    elif peft_type == "HRA":
        method = "hra"
        fields = {"r": raw.get("r", 8), "apply_GS": raw.get("apply_GS", False),
                  "target_modules": raw.get("target_modules")}
    else:
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported "
                                      "(supported: LORA, LORA with use_dora, HRA)")
    if fields["target_modules"] is None:
        raise AdapterValidationError("must list the adapted modules",
                                     tensor="config.target_modules")
    try:
        return method, registry.get(method).parse_config(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise AdapterValidationError(f"{first['msg']} (got {first.get('input')!r})",
                                     tensor=f"config.{field}") from None


def split_keys(method: str, tensors: Mapping[str, torch.Tensor]
               ) -> dict[str, dict[str, torch.Tensor]]:
    """``base_model.model.<path>.<suffix>`` keys -> module path -> tessera tensor name."""
    if not tensors:
        raise AdapterValidationError("contains no tensors", tensor=WEIGHTS_NAME)
    suffixes = _SUFFIXES[method]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterValidationError(f"unexpected key (PEFT keys start with {PREFIX!r})",
                                         tensor=key)
        rest = key[len(PREFIX):]
        hit = next(((s, n) for s, n in suffixes.items() if rest.endswith(s)), None)
        if hit is None or len(rest) == len(hit[0]):
            raise AdapterValidationError(
                f"unexpected key for a {method} adapter (expected <module path> followed by "
                f"one of {sorted(suffixes)})", tensor=key)
        path, name = rest[:-len(hit[0])], hit[1]
        if name in modules.setdefault(path, {}):
            raise AdapterValidationError(f"duplicate tensor {name!r} for {path}", tensor=key)
        modules[path][name] = tensor
    return modules


def _as_dict(config_json: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config_json, Mapping):
        return dict(config_json)
    try:
        raw = json.loads(config_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"not valid JSON: {exc}", tensor=CONFIG_NAME) from None
    if not isinstance(raw, dict):
        raise AdapterValidationError("must be a JSON object", tensor=CONFIG_NAME)
    return raw


def _flag(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterValidationError(f"must be true or false (got {value!r})",
                                     tensor=f"config.{name}")
    return value


def _check_dropout(raw: Mapping[str, Any]) -> None:
    """``lora_dropout`` is off when serving, but a non-finite or out-of-range value marks a
    broken config: refuse it like every other numeric field."""
    value = raw.get("lora_dropout")
    if value is None:
        return
    try:
        _DROPOUT.validate_python(value, strict=True)
    except ValidationError as exc:
        raise AdapterValidationError(f"{exc.errors()[0]['msg']} (got {value!r})",
                                     tensor="config.lora_dropout") from None


def _is_set(value: object) -> bool:
    """PEFT's "unset" values: None, False, empty containers (``0`` is a layer index)."""
    return value is not None and value is not False and value not in ("", [], {})


def _refuse_common(raw: Mapping[str, Any]) -> None:
    if _is_set(raw.get("modules_to_save")):
        raise UnsupportedAdapterError(
            f"modules_to_save {raw['modules_to_save']!r}: fully trained copies of base modules "
            "cannot run on a shared frozen base")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise UnsupportedAdapterError(f"bias={bias!r}: trained base biases cannot run on a "
                                      "shared frozen base (only bias='none' is supported)")
    for name in _COMMON_UNSUPPORTED:
        if _is_set(raw.get(name)):
            raise UnsupportedAdapterError(f"{name}={raw[name]!r} is not supported; list the "
                                          "adapted modules in target_modules instead")


def _refuse_lora(raw: Mapping[str, Any]) -> None:
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} changes the base weights W0; convert the adapter on "
            "save (path_initial_model_for_weight_conversion) so it is a delta against the "
            "original W0")
    if not isinstance(init, bool | str):
        raise AdapterValidationError(f"unexpected value {init!r}",
                                     tensor="config.init_lora_weights")
    for name in _LORA_UNSUPPORTED:
        if _is_set(raw.get(name)):
            raise UnsupportedAdapterError(f"{name}={raw[name]!r}: this LoRA variant is not "
                                          "supported")
