"""Training checkpoints: safetensors + JSON only (no pickle, no ``torch.load``).

A checkpoint directory holds ``state.safetensors`` (the trainable tensors ``param.<name>``,
the optimizer's per-parameter state ``optim.<index>.<key>`` and the CPU RNG state
``rng.torch``) and ``state.json`` (step, optimizer hyperparameters, the run's fingerprint
and its history). Everything else a step depends on is a pure function of (seed, step):
the data order (:func:`tessera.train.data.batch_indices`) and the learning rate
(:func:`tessera.train.loop.learning_rate`). Restoring all of it makes a resumed run
bit-identical to an uninterrupted one on CPU.

Files are written to temporary names and renamed, so an interruption while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.adapters.safeio import read_safetensors, write_safetensors

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
FORMAT = "tessera.train.checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, corrupt, or from another run)."""


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim state_dict
    rng: torch.Tensor  # [n] uint8, torch.get_rng_state()
    fingerprint: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(directory: Path, ckpt: Checkpoint) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v for k, v in ckpt.params.items()}
    per_param: dict[str, dict[str, Any]] = {}
    for index, state in ckpt.optimizer["state"].items():
        scalars = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[key] = value
        per_param[str(index)] = scalars
    tensors["rng.torch"] = ckpt.rng
    meta = {"format": FORMAT, "version": 1, "step": ckpt.step,
            "fingerprint": ckpt.fingerprint, "param_groups": ckpt.optimizer["param_groups"],
            "optimizer_scalars": per_param, "history": ckpt.history}
    # the weights first: a state.json that names a step always has that step's tensors
    _write_atomic(directory / STATE_FILE, write_safetensors(tensors))
    _write_atomic(directory / META_FILE, json.dumps(meta, indent=1).encode())


def load(directory: Path, fingerprint: str) -> Checkpoint:
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors, _ = read_safetensors((directory / STATE_FILE).read_bytes(),
                                      what=str(directory / STATE_FILE))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint in {directory}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE} is not a tessera training checkpoint")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"the checkpoint in {directory} belongs to a run with other settings (method, "
            "data, base or hyperparameters differ); start without --resume or use another "
            "output directory")
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict[str, Any]] = {}
    for index, scalars in meta["optimizer_scalars"].items():
        state[int(index)] = dict(scalars)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return Checkpoint(step=int(meta["step"]), params=params,
                      optimizer={"state": state, "param_groups": meta["param_groups"]},
                      rng=tensors["rng.torch"], fingerprint=fingerprint,
                      history=list(meta.get("history", [])))


def exists(directory: Path) -> bool:
    return (directory / META_FILE).is_file()


def fingerprint_of(settings: Mapping[str, Any]) -> str:
    """A stable digest of everything that determines a run's trajectory."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
