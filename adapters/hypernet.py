"""The HyperLoader hypernetwork (arXiv 2407.01411): config, weights, tasks and generation.

For every *site* = (transformer layer ``l``, position ``p``) the hypernetwork computes::

    e    = [z_task ; E_layer[l] ; E_pos[p]]                         # [3t]
    c    = LayerNorm(W2 relu(W1 e + b1) + b2)                       # [t'] (the projector)
    flat = H_kind c + h_kind                                        # one head per tensor kind
    tensor_kind(l, p) = flat[:numel].reshape(shape of kind at p)

Positions are the generated modules of a layer: one per LoRA target (attention q and v) and
one per bottleneck target (after the attention output projection and after the MLP down
projection). Heads are shared across layers *and* positions; a head's output size is the
largest tensor of its kind, and a position whose tensor is smaller (v under grouped-query
attention) reads the leading elements. Tensor kinds: ``lora_A`` ``[r, in]``, ``lora_B``
``[out, r]``, ``down_weight`` ``[k, d]``, ``down_bias`` ``[k]``, ``up_weight`` ``[d, k]``,
``up_bias``/``ln_weight``/``ln_bias`` ``[d]``.

GPT-2's fused ``c_attn`` (``fused_qkv=True``): positions ``q`` and ``v`` are generated on
the query and value thirds of its output (``[q; k; v]``). They are served as one rank-2r
LoRA on ``c_attn`` with ``A = [A_q; A_v]`` and ``B`` block-diagonal on the q and v row
blocks (zero k rows, zero cross blocks), which is exactly separate q and v LoRAs.

Generated weights depend only on (task, layer, position), never on the input. Generation is
batched over all sites (:func:`generate_batched`); :func:`generate_reference` is the
readable per-site loop it is tested against. Nothing here touches a model: the base enters
only as its targets (``tessera.adapters.targets.discover``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from tessera.adapters import targets as tg
from tessera.adapters.banks.bottleneck import Activation
from tessera.adapters.errors import AdapterError, AdapterValidationError
from tessera.adapters.method import (
    RANK_BOUND,
    SCALE_BOUND,
    MethodConfig,
    PositiveFraction,
    Rank,
    Size,
)
from tessera.adapters.targets import TargetInfo
from tessera.adapters.validation import check_tensors

PROJECTOR_EPS = 1e-5  # eps of the projector's LayerNorm
LORA_KINDS = ("lora_A", "lora_B")
BOTTLENECK_KINDS = ("down_weight", "down_bias", "up_weight", "up_bias", "ln_weight", "ln_bias")
KINDS = LORA_KINDS + BOTTLENECK_KINDS
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class UnknownTaskError(AdapterError):
    """No task embedding registered under that name."""


class HyperLoaderConfig(MethodConfig):
    task_dim: Size = Field(description="t: task, layer and position embedding size")
    hidden_dim: Size = Field(description="projector hidden size")
    projector_dim: Size = Field(description="t': projector output size")
    num_layers: Size = Field(description="transformer layers of the base model")
    # Half the shared bounds: a fused [q; k; v] module is served as one LoRA with 2 r and
    # 2 alpha (tessera.adapters.methods.hyperloader), which must still fit LoraConfig's bounds.
    lora_rank: int = Field(ge=1, le=RANK_BOUND // 2)
    lora_alpha: float = Field(gt=0, le=SCALE_BOUND / 2, allow_inf_nan=False)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                    min_length=1)
    fused_qkv: bool = Field(False, description="lora_targets is one fused [q; k; v] module")
    bottleneck_dim: Rank
    bottleneck_activation: Activation = "relu"
    layer_norm_eps: PositiveFraction = 1e-5
    bottleneck_targets: list[str] = Field(default_factory=lambda: ["o_proj", "down_proj"],
                                          min_length=1)

    @model_validator(mode="after")
    def _targets(self) -> HyperLoaderConfig:
        if self.fused_qkv and len(self.lora_targets) != 1:
            raise ValueError("fused_qkv needs exactly one lora_targets entry (e.g. 'c_attn')")
        for name in ("lora_targets", "bottleneck_targets"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates")
        return self


@dataclass(frozen=True)
class Position:
    index: int  # row of position_embedding
    group: Literal["lora", "bottleneck"]
    module: str  # the lora_targets / bottleneck_targets entry it lives on
    block: int | None = None  # fused qkv: which third of the output (0 = q, 2 = v)


@dataclass(frozen=True)
class Site:
    """One generation site: a position in one layer, bound to a module of the base."""

    layer: int
    position: Position
    target: TargetInfo
    shapes: dict[str, tuple[int, ...]]  # tensor kind -> generated shape


def positions(config: HyperLoaderConfig) -> list[Position]:
    if config.fused_qkv:
        lora = [Position(0, "lora", config.lora_targets[0], 0),
                Position(1, "lora", config.lora_targets[0], 2)]
    else:
        lora = [Position(i, "lora", m) for i, m in enumerate(config.lora_targets)]
    return lora + [Position(len(lora) + i, "bottleneck", m)
                   for i, m in enumerate(config.bottleneck_targets)]


def _site_shapes(config: HyperLoaderConfig, pos: Position, target: TargetInfo
                 ) -> dict[str, tuple[int, ...]]:
    r, k, d = config.lora_rank, config.bottleneck_dim, target.out_features
    if pos.group == "bottleneck":
        return {"down_weight": (k, d), "down_bias": (k,), "up_weight": (d, k),
                "up_bias": (d,), "ln_weight": (d,), "ln_bias": (d,)}
    out = target.out_features
    if pos.block is not None:
        if out % 3:
            raise AdapterValidationError(f"fused qkv output {out} is not divisible by 3",
                                         tensor="config.fused_qkv")
        out //= 3
    return {"lora_A": (r, target.in_features), "lora_B": (out, r)}


def layout(config: HyperLoaderConfig, targets: Mapping[str, TargetInfo]) -> list[Site]:
    """Every (layer, position) site bound to the base's modules, layer-major."""
    layers = {t.layer_index for t in targets.values() if t.layer_index is not None}
    if layers != set(range(config.num_layers)):
        raise AdapterValidationError(
            f"the base model has {len(layers)} layers, the hypernetwork {config.num_layers}",
            tensor="config.num_layers")
    sites = []
    for layer in range(config.num_layers):
        for pos in positions(config):
            paths = [p for p in tg.resolve([pos.module], targets)
                     if targets[p].layer_index == layer]
            if len(paths) != 1:
                raise AdapterValidationError(
                    f"{pos.module!r} matches {len(paths)} modules in layer {layer}, "
                    "expected exactly one", tensor=f"config.{pos.group}_targets")
            target = targets[paths[0]]
            sites.append(Site(layer, pos, target, _site_shapes(config, pos, target)))
    return sites


def head_sizes(sites: list[Site]) -> dict[str, int]:
    """Output size of each head: the largest tensor of its kind over all sites."""
    sizes: dict[str, int] = {}
    for site in sites:
        for kind, shape in site.shapes.items():
            sizes[kind] = max(sizes.get(kind, 0), math.prod(shape))
    return sizes


def base_schema(config: HyperLoaderConfig) -> dict[str, tuple[int, ...]]:
    """Weights whose shapes follow from the config alone (everything but the heads)."""
    t, hidden, tp = config.task_dim, config.hidden_dim, config.projector_dim
    return {"layer_embedding": (config.num_layers, t),          # [L, t]
            "position_embedding": (len(positions(config)), t),  # [P, t]
            "projector.in.weight": (hidden, 3 * t),             # [hidden, 3t]
            "projector.in.bias": (hidden,),
            "projector.out.weight": (tp, hidden),               # [t', hidden]
            "projector.out.bias": (tp,),
            "projector.norm.weight": (tp,),                     # LayerNorm(t')
            "projector.norm.bias": (tp,)}


def head_names() -> list[str]:
    return [f"heads.{kind}.{part}" for kind in KINDS for part in ("weight", "bias")]


def schema(config: HyperLoaderConfig, sites: list[Site]) -> dict[str, tuple[int, ...]]:
    """Every weight name and shape of a hypernetwork for the base the sites come from."""
    shapes = base_schema(config)
    for kind, size in head_sizes(sites).items():
        shapes[f"heads.{kind}.weight"] = (size, config.projector_dim)  # [size, t']
        shapes[f"heads.{kind}.bias"] = (size,)
    return shapes


# --- generation ------------------------------------------------------------------------------
def _project(w: Mapping[str, torch.Tensor], e: torch.Tensor) -> torch.Tensor:
    """Projector MLP with LayerNorm: ``e [M, 3t] -> c [M, t']``."""
    hidden = F.relu(F.linear(e, w["projector.in.weight"], w["projector.in.bias"]))  # [M, hid]
    c = F.linear(hidden, w["projector.out.weight"], w["projector.out.bias"])  # [M, t']
    return F.layer_norm(c, (c.shape[-1],), w["projector.norm.weight"],
                        w["projector.norm.bias"], PROJECTOR_EPS)


def generate_batched(weights: Mapping[str, torch.Tensor], z: torch.Tensor,
                     sites: list[Site]) -> list[dict[str, torch.Tensor]]:
    """All sites at once: one projector pass ``[M, 3t]`` and one GEMM per head."""
    m = len(sites)
    layer_idx = torch.tensor([s.layer for s in sites], device=z.device)  # [M]
    pos_idx = torch.tensor([s.position.index for s in sites], device=z.device)  # [M]
    e = torch.cat([z.expand(m, -1), weights["layer_embedding"][layer_idx],
                   weights["position_embedding"][pos_idx]], dim=1)  # [M, 3t]
    codes = _project(weights, e)  # [M, t']
    out: list[dict[str, torch.Tensor]] = [{} for _ in sites]
    for kind in KINDS:
        rows = [i for i, s in enumerate(sites) if kind in s.shapes]
        if not rows:
            continue
        flat = F.linear(codes[rows], weights[f"heads.{kind}.weight"],
                        weights[f"heads.{kind}.bias"])  # [len(rows), size]
        for j, i in enumerate(rows):
            shape = sites[i].shapes[kind]
            out[i][kind] = flat[j, :math.prod(shape)].reshape(shape).clone()  # own storage
    return out


def generate_reference(weights: Mapping[str, torch.Tensor], z: torch.Tensor,
                       sites: list[Site]) -> list[dict[str, torch.Tensor]]:
    """Readable per-site loop: what :func:`generate_batched` must equal."""
    out = []
    for site in sites:
        e = torch.cat([z, weights["layer_embedding"][site.layer],
                       weights["position_embedding"][site.position.index]])  # [3t]
        c = _project(weights, e.unsqueeze(0))[0]  # [t']
        tensors = {}
        for kind, shape in site.shapes.items():
            head = weights[f"heads.{kind}.weight"] @ c + weights[f"heads.{kind}.bias"]  # [size]
            tensors[kind] = head[:math.prod(shape)].reshape(shape)
        out.append(tensors)
    return out


# --- the hypernetwork object ---------------------------------------------------------------
@dataclass
class HyperNetwork:
    """Config, weights (a flat state dict) and registered task embeddings ``[t]``.

    Base-agnostic data: :meth:`sites` binds it to a base model's targets and validates every
    weight (names, shapes, dtype, finite) against that base.
    """

    config: HyperLoaderConfig
    weights: dict[str, torch.Tensor]
    tasks: dict[str, torch.Tensor] = field(default_factory=dict)

    def num_parameters(self) -> int:
        """Hypernetwork parameters (the state dict), task embeddings excluded."""
        return sum(t.numel() for t in self.weights.values())

    def check_weights(self) -> None:
        """The checks that need no base: names, config-determined shapes, dtype, finite."""
        expected = set(base_schema(self.config)) | set(head_names())
        for name in sorted(set(self.weights) ^ expected):
            reason = "unexpected weight" if name in self.weights else "missing weight"
            raise AdapterValidationError(reason, tensor=f"hypernet.{name}")
        shapes = base_schema(self.config)
        for kind in KINDS:  # head sizes depend on the base; only their pairing is fixed here
            size = self.weights[f"heads.{kind}.bias"].shape[:1]
            shapes[f"heads.{kind}.weight"] = (*size, self.config.projector_dim)  # [size, t']
            shapes[f"heads.{kind}.bias"] = (*size,)  # [size]
        check_tensors("hypernet", self.weights, shapes)

    def sites(self, targets: Mapping[str, TargetInfo]) -> list[Site]:
        """Bind to a base model: its sites, after validating every weight against it."""
        self.check_weights()
        sites = layout(self.config, targets)
        check_tensors("hypernet", self.weights, schema(self.config, sites))
        return sites

    def register_task(self, name: str, embedding: torch.Tensor) -> None:
        """Make a task servable. Names are immutable: re-registering one is refused, so a
        cached generated adapter never goes stale."""
        if not isinstance(name, str) or TASK_NAME.fullmatch(name) is None:
            raise AdapterValidationError(f"task name {name!r} must match {TASK_NAME.pattern}",
                                         tensor="task")
        if name in self.tasks:
            raise AdapterValidationError(f"task {name!r} is already registered",
                                         tensor=f"task.{name}")
        check_tensors("task", {name: embedding}, {name: (self.config.task_dim,)})
        self.tasks[name] = embedding.detach().clone()

    def task_embedding(self, name: str) -> torch.Tensor:
        try:
            return self.tasks[name]  # [t]
        except KeyError:
            raise UnknownTaskError(f"unknown task {name!r}") from None

    def generate_tensors(self, task: str, targets: Mapping[str, TargetInfo], *,
                         reference: bool = False
                         ) -> list[tuple[Site, dict[str, torch.Tensor]]]:
        """Generated tensors per site, in fp32 (the batched path unless ``reference``)."""
        sites = self.sites(targets)
        z = self.task_embedding(task).float()  # [t]
        weights = {k: v.float() for k, v in self.weights.items()}
        run = generate_reference if reference else generate_batched
        with torch.no_grad():
            return list(zip(sites, run(weights, z, sites), strict=True))
