"""Every method's training start: the training copy computes exactly the base where the
method allows an identity init (LoRA B = 0, DoRA m = ||W0||_row, HRA's paired columns,
HUT M_B = 0 / gamma = 1 / beta = 0, SoKA's residual base plus its KPSVD terms, bottleneck
U = 0), and it computes through the registered method's reference forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tessera.adapters import reference_model
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.hra import HraConfig
from tessera.adapters.targets import discover
from tessera.train.base import Base
from tessera.train.finetune import AdapterOptions, Setup, prepare, servable
from tessera.train.modules import TrainLayer
from tessera.train.objective import hra_orthogonality
from tests.helpers import assert_close_scaled, logits

CASES: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "rslora": True},
    "dora": {"method": "dora"},
    "hra": {"method": "hra"},
    "hut": {"method": "hut"},
    "soka": {"method": "soka"},
    "bottleneck": {"method": "bottleneck", "target_modules": ["o_proj", "down_proj"]},
    "bottleneck-ln": {"method": "bottleneck", "bottleneck_layer_norm": True},
}


def ids(base: Base) -> torch.Tensor:
    rows = [base.tokenizer(p)["input_ids"] for p in ("upper: hello\n", "rot13: world\n")]
    return torch.tensor(rows)  # [2, 14]


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_starts_at_the_base(random_base: Base, case: str) -> None:
    setup = prepare(AdapterOptions(**CASES[case]), random_base, seed=3)
    x = ids(random_base)
    want = logits(random_base.model, x)
    got = logits(setup.model, x)
    # SoKA: (W0 - init) x + init x rounds differently from W0 x
    assert_close_scaled(got, want, 1e-5, case)
    layers = [m for m in setup.model.modules() if isinstance(m, TrainLayer)]
    assert layers and all(len(layer.parts) == 1 for layer in layers)
    assert setup.trainable.adapter().components[0].method == CASES[case]["method"]


def test_hra_gram_schmidt_starts_elsewhere(random_base: Base) -> None:
    """R = I - 2 Q Q^T is never the identity: GS mode starts from random directions."""
    setup = prepare(AdapterOptions(method="hra", apply_gs=True), random_base, seed=3)
    x = ids(random_base)
    assert (logits(setup.model, x) - logits(random_base.model, x)).abs().max() > 1e-3


def perturbed(random_base: Base, opts: AdapterOptions) -> Setup:
    setup = prepare(opts, random_base, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in setup.trainable.parameters():
            scale = max(float(p.abs().mean()), 0.05)  # B = 0: give it a size too
            p.add_(0.2 * scale * torch.randn(p.shape, generator=gen))
    return setup


@pytest.mark.parametrize("method", ["lora", "dora", "hra", "hut", "bottleneck"])
def test_training_forward_is_the_reference_forward(random_base: Base, method: str) -> None:
    """Perturbed parameters: the training copy equals tessera's reference model of the
    same adapter (the server's yardstick) bit for bit: one definition of the maths."""
    setup = perturbed(random_base, AdapterOptions(method=method))
    x = ids(random_base)
    want = logits(reference_model(random_base.model, setup.trainable.frozen()), x)
    assert (want - logits(random_base.model, x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(setup.model, x), want, rtol=0, atol=0)
    assert set(discover(setup.model)) == set(discover(random_base.model))


def test_soka_export_serves_the_trained_run(random_base: Base) -> None:
    """SoKA trains on W0 - init; its export (a delta against the ORIGINAL W0) served on
    the untouched base computes what the training copy computes."""
    setup = perturbed(random_base, AdapterOptions(method="soka"))
    served = servable(setup.trainable.frozen(), setup.start)
    x = ids(random_base)
    want = logits(setup.model, x)
    assert (want - logits(random_base.model, x)).abs().max() > 1e-3
    assert_close_scaled(logits(reference_model(random_base.model, served), x), want, 1e-5,
                        "served vs trained")


def test_hra_orthogonality_regulariser() -> None:
    """||I - U'^T U'||_F on unit columns: 0 for orthogonal directions, sqrt(2) for a pair
    of equal ones (PEFT's init), skipped for Gram-Schmidt (orthonormal by construction)."""
    def adapter(u: torch.Tensor, gs: bool = False) -> Adapter:
        config = HraConfig(r=u.shape[1], apply_GS=gs, target_modules=["p"])
        return Adapter((Component("hra", config, {"m.p": {"hra_u": u}}),))

    orthogonal = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)))[0]
    assert float(hra_orthogonality(adapter(3.0 * orthogonal))) == pytest.approx(0, abs=1e-6)
    pair = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0]])  # same direction, two lengths
    assert float(hra_orthogonality(adapter(pair))) == pytest.approx(2 ** 0.5, rel=1e-6)
    assert float(hra_orthogonality(adapter(pair, gs=True))) == 0.0
