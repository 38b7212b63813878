"""Write a trained adapter as the server loads it.

- LoRA, rsLoRA, DoRA, HRA: a PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<module path>.<PEFT suffix>``), as
  ``PeftModel.save_pretrained`` writes it, so ``peft`` itself loads it;
- HUT, SoKA, bottleneck (and composites): tessera's artifact
  (:func:`tessera.adapters.artifact.save`: ``manifest.json`` + ``weights.safetensors``).

Before anything is written the adapter is validated against the base exactly as an upload
is (:func:`tessera.adapters.validation.validate_component`), and a PEFT folder is read back
through :func:`tessera.adapters.peft_io.load_peft_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tessera.adapters import artifact
from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter, Component, Limits
from tessera.adapters.methods.hra import HraConfig
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.peft_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, load_peft_dir
from tessera.adapters.safeio import write_safetensors
from tessera.adapters.validation import validate_component
from tessera.train.base import Base

PEFT_METHODS = ("lora", "dora", "hra")
# tessera tensor name -> PEFT key suffix (what tessera.adapters.peft_io reads back)
_PEFT_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight",
                "lora_magnitude_vector": ".lora_magnitude_vector", "hra_u": ".hra_u"}
# Export checks the adapter against the base only; the server's own size limits (its pool's
# max_rank, 16 by default) are checked when the artifact is uploaded.
EXPORT_LIMITS = Limits(max_rank=1 << 16, max_bottleneck_dim=1 << 16)


def peft_config(component: Component, base: Base) -> dict[str, Any]:
    config = component.config
    common: dict[str, Any] = {
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.path),
        "revision": None, "inference_mode": True, "bias": "none", "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    }
    if isinstance(config, HraConfig):
        return {**common, "peft_type": "HRA", "r": config.r, "apply_GS": config.apply_GS,
                "target_modules": config.target_modules, "init_weights": True}
    assert isinstance(config, LoraConfig)
    available = tg.discover(base.model)
    conv = any(available[p].kind == "conv1d" for p in component.modules)
    return {**common, "peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules, "use_rslora": config.use_rslora,
            "use_dora": component.method == "dora", "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern, "lora_dropout": 0.0,
            "fan_in_fan_out": conv, "init_lora_weights": True}


def peft_tensors(component: Component) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{path}{_PEFT_SUFFIX[name]}": tensor.detach().float().contiguous()
            for path, tensors in component.modules.items() for name, tensor in tensors.items()}


def export_peft(component: Component, out: Path, base: Base) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(peft_config(component, base), indent=2))
    (out / WEIGHTS_NAME).write_bytes(write_safetensors(peft_tensors(component),
                                                       {"format": "pt"}))
    load_peft_dir(out)  # what an upload of this folder parses
    return out


def export_adapter(adapter: Adapter, out: Path, base: Base,
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Validate ``adapter`` against ``base`` and write it in the format its method uses."""
    available = tg.discover(base.model)
    for component in adapter.components:
        validate_component(component, available, EXPORT_LIMITS)
    if len(adapter.components) == 1 and adapter.components[0].method in PEFT_METHODS:
        return export_peft(adapter.components[0], out, base)
    return artifact.save(adapter, out, metadata)


def is_peft_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
