"""The base model's linear layers on the CPU: oneDNN over weights packed once at load.

At decode batch sizes PyTorch's default CPU path for ``F.linear`` (MKL ``sgemm`` on a
row-major weight) leaves most of the machine idle; oneDNN over a weight reordered once
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise``: the kernels inductor's CPU weight freezing emits) is what vLLM's CPU
build and IPEX run. Measured on a 2-core AMD EPYC (AVX2), fp32, best of 30 microseconds
for ``x [32, 1024]``: ``[1024 -> 1024]`` 946 -> 632, ``[1024 -> 2816]`` 2877 -> 1882,
``[2816 -> 1024]`` 2298 -> 1698, the ``[1024 -> 32000]`` LM head 115,888 -> 25,124; at
2,048 rows (prefill) the two tie.

:func:`pack_linears` swaps every plain ``nn.Linear`` of a frozen model for a
:class:`PackedLinear`: the same ``weight`` and ``bias`` Parameters (tied weights stay tied;
the adapter banks read W0 from them), plus the packed copy the forward runs on. The cost
is a second copy of the linear weights. The packed copy is taken once, so the weights must
not be written afterwards (the base is frozen; hot merges live in their own buffers and
are packed beside them, :meth:`tessera.adapters.pool.SlotPool.hot_merge`).

:func:`supported` probes the build and the CPU once per dtype: fp32 on any oneDNN build;
bf16 only where oneDNN has the instructions (AVX-512 BF16 / AVX-NE-CONVERT), otherwise the
model keeps ``F.linear``. Results differ from ``F.linear`` by summation order only
(``~1e-6`` relative in fp32).
"""

from __future__ import annotations

import functools
import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` reordered into oneDNN's blocked layout (an opaque tensor
    only :func:`linear` reads)."""
    return cast(torch.Tensor, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``: ``x`` ``[..., in]``, ``weight`` ``[out, in]`` -> ``[..., out]``, on
    ``packed`` (:func:`pack` of ``weight``) where given. The oneDNN op has no backward, so
    where autograd would need one (``x`` requires grad) it runs ``F.linear`` instead."""
    if packed is None or (x.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    return packed_linear(x, packed, bias)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``x W^T + b`` on ``packed`` (:func:`pack` of ``W``) alone: no backward (callers
    that may need one hold the plain weight and call :func:`linear`)."""
    return cast(torch.Tensor,
                torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))


@functools.cache
def supported(dtype: torch.dtype, device_type: str) -> bool:
    """Whether packed oneDNN linears run here, and agree with ``F.linear`` (probed once)."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen).to(dtype)  # [out, in]
    b = torch.randn(24, generator=gen).to(dtype)  # [out]
    x = torch.randn(5, 40, generator=gen).to(dtype)  # [n, in]
    try:
        got = linear(x, w, pack(w), b)  # [n, out]
    except RuntimeError as exc:  # e.g. bf16 without the instructions oneDNN needs
        log.info("oneDNN packed linear unavailable", extra={"dtype": str(dtype),
                                                             "error": str(exc)})
        return False
    want = F.linear(x, w, b)  # [n, out]
    rtol = PROBE_RTOL.get(dtype, 2e-2)
    return bool(torch.allclose(got.float(), want.float(), rtol=rtol, atol=rtol * 10))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (its ``weight`` and ``bias`` are the original Parameters) whose
    forward runs oneDNN on a packed copy of the weight taken at construction."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # [out, in], shared (tied weights stay tied)
        self.bias = base.bias
        self.packed = pack(base.weight)  # opaque; not state: state_dict() is the Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias)

    def __getstate__(self) -> dict[str, object]:
        """Copies (deepcopy, pickle) leave the opaque packed tensor behind ..."""
        state = self.__dict__.copy()
        del state["packed"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        """... and pack their own copy of the weight."""
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self.packed = pack(self.weight)


def packed_of(module: nn.Module | None) -> torch.Tensor | None:
    """The packed weight ``module`` runs on where it is a :class:`PackedLinear`, else None
    (what :func:`linear` takes as ``packed``)."""
    return module.packed if isinstance(module, PackedLinear) else None


def pack_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of a frozen ``model`` for a :class:`PackedLinear`
    (subclasses, e.g. quantised linears, are left alone). Returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear(module))
            swapped += 1
    return swapped
