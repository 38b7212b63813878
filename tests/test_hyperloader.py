"""HyperLoader: generation against a hand-written per-(layer, position) computation,
determinism, serving through the pool, parameter count and every validation rule."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from tessera.adapters import AdapterValidationError, PoolConfig, SlotPool, merged_model, registry
from tessera.adapters import reference_model as ref_model
from tessera.adapters import targets as tg
from tessera.adapters.hypernet import HyperLoaderConfig, HyperNetwork, UnknownTaskError
from tessera.adapters.method import Adapter
from tessera.adapters.methods.hyperloader import HYPERLOADER
from tests.factories import randn
from tests.factories.hyperloader import make_hypernetwork
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import input_ids, tiny_model

# position index per generated module, in the order the docs define
LLAMA_POS = {"self_attn.q_proj": 0, "self_attn.v_proj": 1, "self_attn.o_proj": 2,
             "mlp.down_proj": 3}
GPT2_POS = {"q": 0, "v": 1, "attn.c_proj": 2, "mlp.c_proj": 3}


def hand_generate(w: dict[str, torch.Tensor], z: torch.Tensor, layer: int, pos: int,
                  kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor for one (layer, position), written out with elementary ops."""
    e = torch.cat([z, w["layer_embedding"][layer], w["position_embedding"][pos]])
    hidden = torch.clamp(w["projector.in.weight"] @ e + w["projector.in.bias"], min=0)
    c = w["projector.out.weight"] @ hidden + w["projector.out.bias"]
    mean = c.mean()
    var = ((c - mean) ** 2).mean()
    c = (c - mean) / torch.sqrt(var + 1e-5) * w["projector.norm.weight"] \
        + w["projector.norm.bias"]
    flat = w[f"heads.{kind}.weight"] @ c + w[f"heads.{kind}.bias"]
    return flat[:math.prod(shape)].reshape(shape)


def setup(family: str, seed: int = 0) -> tuple[torch.nn.Module, HyperNetwork]:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(seed)
    hypernet = make_hypernetwork(model, gen)
    hypernet.register_task("alpha", randn(gen, hypernet.config.task_dim, scale=1.0))
    hypernet.register_task("beta", randn(gen, hypernet.config.task_dim, scale=1.0))
    return model, hypernet


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    assert_close_scaled(a, b, 1e-5, what)


def test_llama_generation_matches_hand_computation() -> None:
    model, hn = setup("llama")
    cfg, w = hn.config, hn.weights
    r, k = cfg.lora_rank, cfg.bottleneck_dim
    z = hn.tasks["alpha"]
    adapter = HYPERLOADER.generate(hn, "alpha", tg.discover(model))
    lora, bottleneck = adapter.components
    assert adapter.methods == ("lora", "bottleneck")
    assert (lora.config.r, lora.config.lora_alpha) == (r, cfg.lora_alpha)
    assert bottleneck.config.layer_norm and bottleneck.config.dim == k
    assert len(lora.modules) == 4 and len(bottleneck.modules) == 4
    for layer in range(2):
        for name, out in (("self_attn.q_proj", 32), ("self_attn.v_proj", 16)):  # GQA: v 16
            got = lora.modules[f"model.layers.{layer}.{name}"]
            pos = LLAMA_POS[name]
            close(got["lora_A"], hand_generate(w, z, layer, pos, "lora_A", (r, 32)), name)
            close(got["lora_B"], hand_generate(w, z, layer, pos, "lora_B", (out, r)), name)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            got = bottleneck.modules[f"model.layers.{layer}.{name}"]
            pos = LLAMA_POS[name]
            shapes = {"down_weight": (k, 32), "down_bias": (k,), "up_weight": (32, k),
                      "up_bias": (32,), "ln_weight": (32,), "ln_bias": (32,)}
            assert set(got) == set(shapes)
            for kind, shape in shapes.items():
                close(got[kind], hand_generate(w, z, layer, pos, kind, shape), f"{name}.{kind}")


def test_gpt2_fused_qkv_is_block_lora_with_zero_k_rows() -> None:
    model, hn = setup("gpt2", seed=1)
    cfg, w = hn.config, hn.weights
    r, d = cfg.lora_rank, 32
    z = hn.tasks["beta"]
    lora, bottleneck = HYPERLOADER.generate(hn, "beta", tg.discover(model)).components
    assert lora.config.r == 2 * r
    assert lora.config.lora_alpha / lora.config.r == cfg.lora_alpha / r
    assert sorted(bottleneck.modules) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj"))
    for layer in range(2):
        got = lora.modules[f"transformer.h.{layer}.attn.c_attn"]
        a_q = hand_generate(w, z, layer, GPT2_POS["q"], "lora_A", (r, d))
        a_v = hand_generate(w, z, layer, GPT2_POS["v"], "lora_A", (r, d))
        b_q = hand_generate(w, z, layer, GPT2_POS["q"], "lora_B", (d, r))
        b_v = hand_generate(w, z, layer, GPT2_POS["v"], "lora_B", (d, r))
        want_b = torch.zeros(3 * d, 2 * r)
        want_b[:d, :r] = b_q
        want_b[2 * d:, r:] = b_v
        close(got["lora_A"], torch.cat([a_q, a_v]), "A")
        close(got["lora_B"], want_b, "B")
        assert bool((got["lora_B"][d:2 * d] == 0).all())  # keys untouched
        got_b = bottleneck.modules[f"transformer.h.{layer}.mlp.c_proj"]
        close(got_b["up_weight"], hand_generate(w, z, layer, GPT2_POS["mlp.c_proj"],
                                                "up_weight", (d, cfg.bottleneck_dim)), "up")


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_batched_equals_reference_loop(family: str) -> None:
    model, hn = setup(family, seed=2)
    targets = tg.discover(model)
    fast = HYPERLOADER.generate(hn, "alpha", targets)
    slow = HYPERLOADER.generate(hn, "alpha", targets, reference=True)
    for cf, cs in zip(fast.components, slow.components, strict=True):
        assert cf.config == cs.config and cf.modules.keys() == cs.modules.keys()
        for path in cf.modules:
            for name, tensor in cf.modules[path].items():
                close(tensor, cs.modules[path][name], f"{path}.{name}")


def test_same_task_identical_different_tasks_differ() -> None:
    model, hn = setup("mistral", seed=3)
    targets = tg.discover(model)
    first = HYPERLOADER.generate(hn, "alpha", targets)
    again = HYPERLOADER.generate(hn, "alpha", targets)
    other = HYPERLOADER.generate(hn, "beta", targets)
    for c1, c2, c3 in zip(first.components, again.components, other.components, strict=True):
        for path, tensors in c1.modules.items():
            for name, tensor in tensors.items():
                assert torch.equal(tensor, c2.modules[path][name])
                assert not torch.allclose(tensor, c3.modules[path][name], atol=1e-4)


def test_weights_depend_on_layer_only_through_its_embedding() -> None:
    model, hn = setup("llama", seed=4)
    hn.weights["layer_embedding"][1] = hn.weights["layer_embedding"][0]
    lora, bottleneck = HYPERLOADER.generate(hn, "alpha", tg.discover(model)).components
    for comp, name in ((lora, "self_attn.v_proj"), (bottleneck, "mlp.down_proj")):
        zero, one = comp.modules[f"model.layers.0.{name}"], comp.modules[f"model.layers.1.{name}"]
        assert all(torch.equal(zero[k], one[k]) for k in zero)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("budget", [0, 1 << 40])
def test_generated_adapters_serve_in_a_pool(family: str, budget: int) -> None:
    model, hn = setup(family, seed=5)
    targets = tg.discover(model)
    adapters: list[Adapter] = [HYPERLOADER.generate(hn, t, targets) for t in ("alpha", "beta")]
    ids = input_ids(4, 6)
    refs = [logits(ref_model(model, a), ids) for a in adapters]
    base = logits(model, ids)
    assert (refs[0] - base).abs().max() > 1e-3
    assert_close_scaled(logits(merged_model(model, adapters[0]), ids), refs[0], 1e-5)
    pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8, max_bottleneck_dim=8,
                                      gather_budget=budget))
    pool.load(1, adapters[0])
    pool.load(2, adapters[1])
    slots = [2, 1, -1, 1]
    mixed = pool_logits(pool, model, ids, slots)
    for row, slot in enumerate(slots):
        want = {1: refs[0], 2: refs[1]}.get(slot, base)[row]
        assert_close_scaled(mixed[row], want, 1e-5, f"row {row}")


def test_parameter_count() -> None:
    model, hn = setup("llama", seed=6)
    c = hn.config
    t, hid, tp, r, k, d = (c.task_dim, c.hidden_dim, c.projector_dim, c.lora_rank,
                           c.bottleneck_dim, 32)
    heads = {"lora_A": r * d, "lora_B": d * r, "down_weight": k * d, "down_bias": k,
             "up_weight": d * k, "up_bias": d, "ln_weight": d, "ln_bias": d}
    formula = (2 * t + 4 * t + hid * 3 * t + hid + tp * hid + tp + 2 * tp
               + sum(size * tp + size for size in heads.values()))
    assert hn.num_parameters() == formula == sum(v.numel() for v in hn.weights.values())
    assert hn.num_parameters() == sum(
        v.numel() for k_, v in hn.weights.items() if not k_.startswith("task"))
    hn.sites(tg.discover(model))  # validates: shapes agree with the formula's


def test_generator_is_registered() -> None:
    assert "hyperloader" in registry.all_names()
    assert "hyperloader" not in registry.names()
    assert registry.get_generator("hyperloader") is HYPERLOADER


def test_task_registration_rules() -> None:
    model, hn = setup("llama", seed=7)
    t = hn.config.task_dim
    for bad in ("", "../x", "a/b", "x\x00", "a" * 200):
        with pytest.raises(AdapterValidationError, match="task name"):
            hn.register_task(bad, torch.zeros(t))
    with pytest.raises(AdapterValidationError, match="already registered"):
        hn.register_task("alpha", torch.zeros(t))
    with pytest.raises(AdapterValidationError, match="shape"):
        hn.register_task("gamma", torch.zeros(t + 1))
    with pytest.raises(AdapterValidationError, match="NaN"):
        hn.register_task("gamma", torch.full((t,), float("nan")))
    with pytest.raises(UnknownTaskError):
        HYPERLOADER.generate(hn, "gamma", tg.discover(model))


def test_weights_validated_against_the_base() -> None:
    model, hn = setup("llama", seed=8)
    targets = tg.discover(model)
    gpt2_targets = tg.discover(tiny_model("gpt2"))
    with pytest.raises(AdapterValidationError) as err:  # llama module names on gpt2
        hn.sites(gpt2_targets)
    assert err.value.tensor == "config.lora_targets"
    three_layers = tg.discover(tiny_model("llama", layers=3))
    with pytest.raises(AdapterValidationError) as err:
        hn.sites(three_layers)
    assert err.value.tensor == "config.num_layers"
    cases = {
        "heads.lora_B.weight": torch.zeros(5, hn.config.projector_dim),  # wrong size
        "projector.in.weight": torch.zeros(3, 3),
        "layer_embedding": torch.full_like(hn.weights["layer_embedding"], float("inf")),
    }
    for name, bad in cases.items():
        broken = HyperNetwork(hn.config, {**hn.weights, name: bad})
        with pytest.raises(AdapterValidationError) as err:
            broken.sites(targets)
        assert err.value.tensor == f"hypernet.{name}"
    missing = HyperNetwork(hn.config, {k: v for k, v in hn.weights.items()
                                       if k != "heads.ln_bias.bias"})
    with pytest.raises(AdapterValidationError, match="missing") as err:
        missing.sites(targets)
    assert err.value.tensor == "hypernet.heads.ln_bias.bias"
    extra = HyperNetwork(hn.config, {**hn.weights, "heads.extra.weight": torch.zeros(1, 1)})
    with pytest.raises(AdapterValidationError, match="unexpected"):
        extra.sites(targets)


@pytest.mark.parametrize("update", [
    {"fused_qkv": True},  # two lora targets
    {"lora_targets": []},
    {"bottleneck_targets": ["o_proj", "o_proj"]},
    {"bottleneck_activation": "sigmoid"},
    {"lora_rank": 0},
    {"unknown": 1},
    {"task_dim": 4.0},
])
def test_config_is_strict(update: dict[str, object]) -> None:
    raw = {"task_dim": 4, "hidden_dim": 8, "projector_dim": 4, "num_layers": 2,
           "lora_rank": 2, "lora_alpha": 4.0, "bottleneck_dim": 3}
    HyperLoaderConfig.model_validate(raw)
    with pytest.raises(ValidationError):
        HYPERLOADER.parse_config({**raw, **update})
