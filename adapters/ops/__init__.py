"""Kernel backends of the banks' batched ops: one signature per op, one module per backend
(vLLM's ``ops/torch_ops`` and ``ops/triton_ops``).

- ``lora(h, x, a, b, groups, rank) -> [N, out]``: ``h + B_s (A_s x)`` for every token of
  ``groups`` (:class:`~tessera.adapters.plan.Groups`: tokens sorted by slot), ``A_s`` and
  ``B_s`` read from the low-rank bank's tensors ``a [S + 1, r_max, in]`` and
  ``b [S + 1, out, r_max]`` by slot id, up to ``rank``; other tokens keep ``h``.

:mod:`.torch_ops` (any device) gathers each token's factors (BGMV-like, the low-rank
bank's per-token form); :mod:`.triton_ops` (CUDA, or Triton's interpreter on the CPU for
tests) runs an SGMV-like shrink and expand over the groups, reading each slot's factors in
place: no gather, no stacked copy. :func:`resolve` turns the setting into a backend:
``auto`` takes Triton on CUDA only where a start-up probe (:func:`triton_agrees`: the
kernels compile, run and equal the torch backend on a small case) passes, like the CPU's
packed-linear probe (:func:`tessera.adapters.kernels.supported`). On the CPU the low-rank
bank keeps its own forms (stacked, segment, per-token by cost:
:mod:`tessera.adapters.banks.lowrank`), measured faster there.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from tessera.adapters.plan import Groups

log = logging.getLogger(__name__)

Backend = Literal["torch", "triton"]
Choice = Literal["auto", "torch", "triton"]
# lora(h, x, a, b, groups, rank) -> h + B_s (A_s x) on the grouped tokens
LoraOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "Groups", int],
                  torch.Tensor]


def op(package: str, name: str, backend: Backend) -> Any:
    """Op ``name`` of ``backend`` in the kernel package ``package`` (its modules
    ``torch_ops`` and ``triton_ops``), imported on first use: Triton only where asked."""
    return getattr(importlib.import_module(f"{package}.{backend}_ops"), name)


@functools.cache
def lora(backend: Backend) -> LoraOp:
    """The ``lora`` op of ``backend``."""
    found: LoraOp = op(__name__, "lora", backend)
    return found


def triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: CUDA with Triton installed, or the CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# a probe's case: (the Triton op's result, the torch op's) on a device, in a dtype
Case = Callable[[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def agrees(what: str, case: Case, device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels of ``what`` run on ``device_type`` in ``dtype`` and equal
    the torch backend's on ``case``. A failure is logged, never raised: the caller keeps
    its torch forms."""
    device = torch.device(device_type)
    if not triton_runs(device):
        return False
    try:
        got, want = case(device, dtype)
    except Exception as exc:  # compile or launch failure: keep the torch forms
        log.warning("Triton kernels unavailable; torch forms",
                    extra={"op": what, "device": device_type, "dtype": str(dtype),
                           "error": repr(exc)})
        return False
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    agree = bool(torch.allclose(got.float(), want.float(), rtol=rtol, atol=rtol * 10))
    if not agree:
        log.warning("Triton kernels disagree with torch; torch forms",
                    extra={"op": what, "device": device_type, "dtype": str(dtype)})
    return agree


def _lora_case(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Three slots, base tokens, a group past one block."""
    from tessera.adapters.plan import Routing

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 40, generator=gen)  # [S + 1, r_max, in]
    b = torch.randn(4, 72, 8, generator=gen)  # [S + 1, out, r_max]
    a[3], b[3] = 0.0, 0.0
    x = torch.randn(23, 40, generator=gen)  # [N, in]
    h = torch.randn(23, 72, generator=gen)  # [N, out]
    a, b, x, h = (t.to(device, dtype) for t in (a, b, x, h))
    slots = torch.tensor([2] * 17 + [0, -1, 1, 0, -1, 1])  # [N]
    groups = Routing(slots, 3, 0, device=device).groups([0, 1, 2])
    return (lora("triton")(h, x, a, b, groups, 6),  # [N, out]
            lora("torch")(h, x, a, b, groups, 6))


@functools.cache
def triton_agrees(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Triton ``lora`` op runs on ``device_type`` in ``dtype`` and equals the
    torch backend's on a small mixed case (probed once)."""
    return agrees("lora", _lora_case, device_type, dtype)


def resolve(choice: Choice, device: torch.device, dtype: torch.dtype = torch.float32
            ) -> Backend:
    """The backend of ``choice`` on ``device`` for ``dtype`` banks: ``auto`` is Triton on
    CUDA where it is installed and its probe passes, else torch; ``triton`` where it
    cannot run is refused."""
    if choice == "auto":
        return ("triton" if device.type == "cuda" and triton_agrees(device.type, dtype)
                else "torch")
    if choice == "triton" and not triton_runs(device):
        raise ValueError(f"Triton kernels do not run on {device} here (CUDA with triton "
                         "installed, or TRITON_INTERPRET=1 on the CPU)")
    return choice
