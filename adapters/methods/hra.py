"""HRA: Householder reflection adaptation (Yuan et al., NeurIPS 2024; PEFT ``HRAConfig``).

Tensor per module: ``hra_u U [in, r]`` (PEFT's layout). Config: ``r``, ``apply_GS``,
``target_modules``. Semantics follow PEFT's ``HRALinear.get_delta_weight`` / ``forward``:

- without ``apply_GS``: unit columns ``u_i = U[:, i] / ||U[:, i]||`` and
  ``R = H_0 H_1 ... H_{r-1}``, ``H_i = I - 2 u_i u_i^T`` (PEFT right-multiplies in order
  ``i = 0 .. r-1``);
- with ``apply_GS``: ``Q = GramSchmidt(U)`` (PEFT's modified Gram-Schmidt, column order
  kept) and ``R = I - 2 Q Q^T``.

The layer computes ``y = (W0 R) x + b``. ``R`` acts on the *input* dimension, so for GPT-2's
Conv1D (which PEFT's HRA does not support) tessera applies the same math to W0 in its
``[out, in]`` orientation. Merge: ``W' = W0 R``.

Reference forward: the reflection chain on each token, the *last* reflection first
(``x <- x - 2 u_i (u_i^T x)`` for ``i = r-1 .. 0``), or ``x - 2 Q (Q^T x)`` with GS; no dense
``[in, in]`` matrix. Mixed batch: the exact compact-WY form of the product,
``R = I + Y Gamma Y^T`` with ``Y = [u_0 .. u_{r-1}]`` and upper-triangular ``Gamma``, so the
``lowrank`` bank runs it as LoRA with ``A = Y^T``, ``B = W0 Y Gamma`` (GS: ``A = Q^T``,
``B = -2 W0 Q``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.adapters.errors import AdapterValidationError
from tessera.adapters.method import Method, MethodConfig, Rank, SlotData, Tensors
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo

GS_RELATIVE_TOL = 1e-4  # Gram-Schmidt residual below this share of the column: dependent


class HraConfig(MethodConfig):
    r: Rank = 8
    apply_GS: bool = False
    target_modules: list[str] | str


def unit_columns(u: torch.Tensor) -> torch.Tensor:
    """``U / ||U||_col`` ``[in, r]`` (PEFT: ``opt_u / opt_u.norm(dim=0)``)."""
    norms: torch.Tensor = u.norm(dim=0)  # [r]
    return u / norms


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """PEFT's Gram-Schmidt ``Q [in, r]``: each column minus its projections on the previous
    (already orthonormal) ones, one at a time, then normalised."""
    cols: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        ui = u[:, i]  # [in]
        for q in cols:
            ui = ui - (q @ ui) * q
        cols.append(ui / ui.norm())
    return torch.stack(cols, dim=1)  # [in, r]


def reflection_matrix(config: HraConfig, u: torch.Tensor) -> torch.Tensor:
    """Dense ``R [in, in]`` built exactly as PEFT's ``get_delta_weight``."""
    eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)  # [in, in]
    if config.apply_GS:
        q = gram_schmidt(u)  # [in, r]
        return eye - 2 * q @ q.t()
    y = unit_columns(u)  # [in, r]
    r_mat = eye
    for i in range(y.shape[1]):
        ui = y[:, i : i + 1]  # [in, 1]
        r_mat = r_mat - 2 * (r_mat @ ui) @ ui.t()  # R <- R H_i
    return r_mat


def wy_factors(config: HraConfig, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y [in, r], Gamma [r, r])`` with ``R = I + Y Gamma Y^T`` exactly.

    Compact WY (Schreiber & Van Loan): ``H_0 .. H_{k-1} = I - Y_k T_k Y_k^T`` and appending
    ``H_k = I - 2 y y^T`` gives ``T_{k+1} = [[T_k, -2 T_k Y_k^T y], [0, 2]]``; ``Gamma = -T``.
    """
    if config.apply_GS:
        q = gram_schmidt(u)  # [in, r]
        return q, -2 * torch.eye(q.shape[1], dtype=u.dtype, device=u.device)
    y = unit_columns(u)  # [in, r]
    r = y.shape[1]
    t = torch.zeros(r, r, dtype=u.dtype, device=u.device)  # [r, r], upper triangular
    for k in range(r):
        t[:k, k] = -2 * (t[:k, :k] @ (y[:, :k].t() @ y[:, k]))  # [k]
        t[k, k] = 2.0
    return y, -t


class HRA(Method[HraConfig]):
    name = "hra"
    config_type = HraConfig
    banks = ("lowrank",)

    def schema(self, config: HraConfig, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        return {"hra_u": (target.in_features, config.r)}

    def rank(self, config: HraConfig, target: TargetInfo) -> int:
        return config.r

    def check(self, config: HraConfig, tensors: Tensors, target: TargetInfo) -> None:
        u = tensors["hra_u"].float()  # [in, r]
        key = f"{target.path}.hra_u"
        norms = u.norm(dim=0)  # [r]
        if bool((norms == 0).any()):
            raise AdapterValidationError("has an all-zero column (no reflection direction)",
                                         tensor=key)
        if config.apply_GS:
            if config.r > target.in_features:
                raise AdapterValidationError(
                    f"apply_GS needs r <= in_features ({config.r} > {target.in_features})",
                    tensor=key)
            q_cols: list[torch.Tensor] = []
            for i in range(config.r):
                ui = u[:, i]  # [in]
                for q in q_cols:
                    ui = ui - (q @ ui) * q
                residual = ui.norm()
                if residual <= GS_RELATIVE_TOL * norms[i]:
                    raise AdapterValidationError(
                        f"column {i} is linearly dependent on the previous ones: Gram-Schmidt "
                        "is undefined (PEFT's paired init with apply_GS)", tensor=key)
                q_cols.append(ui / residual)

    def reference(self, config: HraConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        u = tensors["hra_u"]  # [in, r]
        if config.apply_GS:
            q = gram_schmidt(u)  # [in, r]
            x = x - 2 * (x @ q) @ q.t()  # R x = x - 2 Q (Q^T x), [N, in]
        else:
            y = unit_columns(u)  # [in, r]
            for i in reversed(range(y.shape[1])):  # R x = H_0 (H_1 (... (H_{r-1} x)))
                ui = y[:, i]  # [in]
                x = x - 2 * (x @ ui).unsqueeze(1) * ui  # [N, in]
        return F.linear(x, weight, bias)  # [N, out]

    def merge(self, config: HraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r_mat = reflection_matrix(config, tensors["hra_u"].to(weight.dtype))  # [in, in]
        return weight @ r_mat, bias  # [out, in]

    def lower(self, config: HraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        y, gamma = wy_factors(config, tensors["hra_u"].to(weight.dtype))  # [in, r], [r, r]
        a = y.t().contiguous()  # [r, in]
        b = weight @ (y @ gamma)  # [out, r]
        return {"lowrank": SlotData({"A": a, "B": b})}


register(HRA())
