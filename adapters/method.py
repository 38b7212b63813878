"""The contract every adapter method fulfils, and the data it works on.

A method turns a validated weight set into (a) a readable single-adapter reference forward,
(b) a merged weight where the math allows, and (c) *slot data*: tensors written into the
per-module banks of a :class:`~tessera.adapters.pool.SlotPool`, where the batched mixed forward of
every method runs. Methods never touch the base model; they receive ``W0`` ``[out, in]``.

Stages of a wrapped layer (see :mod:`tessera.adapters.layer`) in the order they run::

    x' = input banks(x)                # HUT's gamma * x + beta
    y  = W0 x' + delta banks(x')       # LoRA/DoRA/HRA low-rank, HUT Hadamard, SoKA Kronecker
    y  = scale banks(y) + b            # DoRA's magnitude
    y  = output banks(y)               # bottleneck adapter layers

A "weight" stage method acts through the first three; an "output" stage method through the
last one. One adapter may combine one weight-stage and one output-stage component per module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from tessera.adapters import targets as tg
from tessera.adapters.errors import NotMergeableError
from tessera.adapters.targets import TargetInfo

Tensors = Mapping[str, torch.Tensor]  # tensor name -> tensor, for one module
Stage = Literal["weight", "output"]


# --- bounded config scalars ------------------------------------------------------------------
# Every numeric field of every method config uses one of these types, so pydantic refuses
# NaN/Inf and absurd magnitudes naming the field. Finite is not enough: alpha = 1e38 is
# finite, yet folding s = alpha / r into B overflows the banks. The lowered tensors are
# checked too (``tessera.adapters.validation.check_lowered``): these bounds are the sanity layer.
SCALE_BOUND = 1e4  # |alpha|, |scale|. PEFT practice is alpha <= 2 r <= 512 (s <= ~16,
#                    rsLoRA's alpha / sqrt(r) a little more); 1e4 leaves a 20x margin and
#                    keeps s * |w| far from the fp16 limit 65504 for sane weights (|w| < 6).
RANK_BOUND = 1 << 16  # ranks, bottleneck widths, numbers of Kronecker terms: above every
#                       model's hidden size (a rank beyond min(out, in) is meaningless).
#                       Deployments enforce their own, far lower ``Limits``.
SIZE_BOUND = 1 << 20  # other sizes: hypernetwork widths, layer counts, Kronecker factors.

Scale = Annotated[float, Field(allow_inf_nan=False, ge=-SCALE_BOUND, le=SCALE_BOUND)]
PositiveScale = Annotated[float, Field(allow_inf_nan=False, gt=0, le=SCALE_BOUND)]
Rank = Annotated[int, Field(ge=1, le=RANK_BOUND)]
Size = Annotated[int, Field(ge=1, le=SIZE_BOUND)]
# (0, 1]: LayerNorm eps (larger would swamp the variance it regularises), energy shares.
PositiveFraction = Annotated[float, Field(allow_inf_nan=False, gt=0, le=1)]
Probability = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]  # [0, 1]: dropout


class MethodConfig(BaseModel):
    """Base of every method config: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


C = TypeVar("C", bound=MethodConfig)


@dataclass(frozen=True)
class Limits:
    """Size limits an adapter must respect (the slot pool's, or the server's upload policy)."""

    max_rank: int = 64  # LoRA/DoRA/HRA rank, HUT rank, SoKA number of Kronecker terms
    max_bottleneck_dim: int = 256


@dataclass
class SlotData:
    """What one component writes into one bank of one module's slot."""

    tensors: dict[str, torch.Tensor]  # bank tensor name -> [dims <= bank dims], zero/one padded
    meta: dict[str, Any] = field(default_factory=dict)  # host-side flags (activation, eps, ...)


@dataclass(frozen=True)
class Component:
    """One method's weights inside an adapter."""

    method: str
    config: MethodConfig
    modules: Mapping[str, Tensors]  # module path -> tensor name -> tensor

    def num_parameters(self) -> int:
        return sum(t.numel() for tensors in self.modules.values() for t in tensors.values())


@dataclass(frozen=True)
class Adapter:
    """What a slot holds: one component, or several (a HyperLoader task = LoRA + bottleneck)."""

    components: tuple[Component, ...]

    def num_parameters(self) -> int:
        return sum(c.num_parameters() for c in self.components)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(c.method for c in self.components)


class Method(ABC, Generic[C]):
    """One adapter method. Subclasses live one per file and call :func:`register`."""

    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]]
    stage: ClassVar[Stage] = "weight"
    banks: ClassVar[tuple[str, ...]]  # bank kinds this method writes (see tessera.adapters.banks)
    rank_limit: ClassVar[Literal["max_rank", "max_bottleneck_dim"]] = "max_rank"

    # --- config -------------------------------------------------------------------------
    def parse_config(self, raw: Mapping[str, Any]) -> C:
        """Validate a JSON-like config strictly (pydantic raises naming the field)."""
        return self.config_type.model_validate(dict(raw))  # type: ignore[return-value]

    def target_paths(self, config: C, available: Mapping[str, TargetInfo]) -> list[str]:
        """Module paths the config selects; default: PEFT's ``target_modules`` rule."""
        spec = getattr(config, "target_modules")  # noqa: B009 - every built-in config has it
        return tg.resolve(spec, available)

    # --- schema ---------------------------------------------------------------------------
    @abstractmethod
    def schema(self, config: C, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        """Expected tensor names and shapes on one module."""

    @abstractmethod
    def rank(self, config: C, target: TargetInfo) -> int:
        """The size compared against ``Limits.<rank_limit>`` on this module."""

    def check(self, config: C, tensors: Tensors, target: TargetInfo) -> None:
        """Method-specific rules beyond names/shapes/dtype/finiteness (raise on failure)."""

    # --- math -----------------------------------------------------------------------------
    @abstractmethod
    def reference(self, config: C, tensors: Tensors, target: TargetInfo, weight: torch.Tensor,
                  bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Readable single-adapter layer output ``[N, out]`` for ``x: [N, in]``."""

    def reference_output(self, config: C, tensors: Tensors, target: TargetInfo,
                         h: torch.Tensor) -> torch.Tensor:
        """Output-stage methods: transform the layer output ``h: [N, out]``."""
        raise NotImplementedError(f"{self.name} is a weight-stage method")

    def merge(self, config: C, tensors: Tensors, target: TargetInfo, weight: torch.Tensor,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New ``(W', b')`` with ``W'`` ``[out, in]``; never modifies its inputs."""
        raise NotMergeableError(f"method {self.name!r} has no merged-weight form")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not Method.merge

    @abstractmethod
    def lower(self, config: C, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        """Slot data per bank kind for one module (computed off the forward loop)."""

    def num_parameters(self, component: Component) -> int:
        return component.num_parameters()
