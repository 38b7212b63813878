"""Kernel backends of the banks' batched ops: one signature per op, one module per backend
(vLLM's ``ops/torch_ops`` and ``ops/triton_ops``).

- ``lora(h, x, a, b, groups, rank) -> [N, out]``: ``h + B_s (A_s x)`` for every token of
  ``groups`` (:class:`~tessera.adapters.plan.Groups`: tokens sorted by slot), ``A_s`` and
  ``B_s`` read from the low-rank bank's tensors ``a [S + 1, r_max, in]`` and
  ``b [S + 1, out, r_max]`` by slot id, up to ``rank``; other tokens keep ``h``.

:mod:`.torch_ops` (any device) gathers each token's factors (BGMV-like, the low-rank
bank's per-token form); :mod:`.triton_ops` (CUDA, or Triton's interpreter on the CPU for
tests) runs an SGMV-like shrink and expand over the groups, reading each slot's factors in
place: no gather, no stacked copy. :func:`resolve` turns the setting into a backend. On
the CPU the low-rank bank keeps its own forms (stacked, segment, per-token by cost:
:mod:`tessera.adapters.banks.lowrank`), measured faster there.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from tessera.adapters.plan import Groups

Backend = Literal["torch", "triton"]
Choice = Literal["auto", "torch", "triton"]
# lora(h, x, a, b, groups, rank) -> h + B_s (A_s x) on the grouped tokens
LoraOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "Groups", int],
                  torch.Tensor]


@functools.cache
def lora(backend: Backend) -> LoraOp:
    """The ``lora`` op of ``backend`` (Triton imported only where it is asked for)."""
    if backend == "triton":
        from tessera.adapters.ops import triton_ops

        return triton_ops.lora
    from tessera.adapters.ops import torch_ops

    return torch_ops.lora


def triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: CUDA with Triton installed, or the CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(choice: Choice, device: torch.device) -> Backend:
    """The backend of ``choice`` on ``device``: ``auto`` is Triton on CUDA where it is
    installed, else torch; ``triton`` where it cannot run is refused."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_runs(device) else "torch"
    if choice == "triton" and not triton_runs(device):
        raise ValueError(f"Triton kernels do not run on {device} here (CUDA with triton "
                         "installed, or TRITON_INTERPRET=1 on the CPU)")
    return choice
