"""Checks a component's weights against a base model. Every error names the tensor."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tessera.adapters import registry
from tessera.adapters.errors import AdapterValidationError
from tessera.adapters.method import Component, Limits, SlotData
from tessera.adapters.targets import TargetInfo

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_component(component: Component, available: Mapping[str, TargetInfo],
                       limits: Limits) -> None:
    """Raise :class:`AdapterValidationError` on the first rule the component breaks.

    Rules, in order: target modules exist in the base and every targeted module has
    weights; no weights for modules the config does not target; per module, exactly the
    schema's tensor names with its shapes; floating dtypes; finite values; rank limit; then
    the method's own checks. Config scalars are bounded by the config types; the *lowered*
    tensors need W0 and the banks' dtype and are checked by :func:`check_lowered` (run by
    ``SlotPool.lower``, hence on every prepare, write and server upload).
    """
    method = registry.get(component.method)
    config = component.config
    if not isinstance(config, method.config_type):
        raise AdapterValidationError(
            f"config is {type(config).__name__}, expected {method.config_type.__name__}",
            tensor="config")
    wanted = method.target_paths(config, available)
    if not wanted:
        raise AdapterValidationError(
            "selects no adaptable module of the base model", tensor="config.target_modules")
    for path, tensors in component.modules.items():
        if path not in available:
            first = next(iter(tensors), "weight")
            raise AdapterValidationError(
                f"module {path!r} does not exist in the base model or is not an adaptable "
                "projection", tensor=f"{path}.{first}")
        if path not in wanted:
            first = next(iter(tensors), "weight")
            raise AdapterValidationError(
                f"module {path!r} is not selected by the config's target modules",
                tensor=f"{path}.{first}")
    for path in wanted:
        target = available[path]
        schema = method.schema(config, target)
        if path not in component.modules:
            name = next(iter(schema))
            raise AdapterValidationError("missing tensor for a targeted module",
                                         tensor=f"{path}.{name}")
        tensors = component.modules[path]
        check_tensors(path, tensors, schema)
        limit = getattr(limits, method.rank_limit)
        rank = method.rank(config, target)
        if rank > limit:
            name = next(iter(schema))
            raise AdapterValidationError(
                f"rank {rank} exceeds the limit {limit} ({method.rank_limit})",
                tensor=f"{path}.{name}")
        method.check(config, tensors, target)


def check_tensors(path: str, tensors: Mapping[str, torch.Tensor],
                  schema: Mapping[str, tuple[int, ...]]) -> None:
    """Names, shapes, dtype and finiteness of one module's tensors against its schema."""
    for name in tensors:
        if name not in schema:
            raise AdapterValidationError(
                f"unexpected tensor (expected one of {sorted(schema)})", tensor=f"{path}.{name}")
    for name, shape in schema.items():
        key = f"{path}.{name}"
        if name not in tensors:
            raise AdapterValidationError("missing tensor", tensor=key)
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise AdapterValidationError(
                f"shape {list(tensor.shape)} does not match the expected {list(shape)}",
                tensor=key)
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(
                f"dtype {tensor.dtype} is not float32, float16 or bfloat16", tensor=key)
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError("contains NaN or Inf values", tensor=key)


def check_lowered(data: Mapping[tuple[str, str], SlotData], dtype: torch.dtype) -> None:
    """Every lowered tensor is finite once cast to the banks' ``dtype``.

    Lowering folds config scalars into the weights (LoRA's ``s B``, SoKA's ``s A``, HUT's
    ``s M_A``, DoRA's ``g``), so finite uploads under bounded scalars can still overflow:
    in float32 while lowering, or in the cast to a float16/bfloat16 bank. One host sync for
    the whole adapter; the error names ``<module path>.<bank kind>.<tensor>``.
    """
    named = [(f"{path}.{kind}.{name}", tensor) for (path, kind), slot in data.items()
             for name, tensor in slot.tensors.items()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t.to(dtype)).all() for _, t in named])  # [tensors]
    if bool(finite.all()):
        return
    key, tensor = named[int(torch.nonzero(~finite)[0, 0])]
    peak = float(tensor.float().abs().max())
    raise AdapterValidationError(
        f"not finite once lowered into a {str(dtype).removeprefix('torch.')} slot (largest "
        f"|value| {peak:.4g}, limit {torch.finfo(dtype).max:.4g}): the config's scale times "
        "the weights overflows", tensor=key)
