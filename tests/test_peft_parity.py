"""Adapters trained-looking in ``peft`` (non-identity weights), saved with ``save_pretrained``,
loaded by tessera and served in a mixed batch: each row equals PEFT's own forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import HRAConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from tessera.adapters import Adapter, PoolConfig, SlotPool, merged_model
from tessera.adapters.peft_io import load_peft_dir
from tests.helpers import logits, pool_logits
from tests.models import input_ids, tiny_model

ATOL = 1e-4


def randomize(model: PeftModel, seed: int) -> None:
    """Give every adapter tensor non-identity values (PEFT inits LoRA B = 0, the DoRA
    magnitude to ||W0||_row and HRA's columns in identical pairs, all identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.3 * noise.clamp(-2, 2))
            elif "lora_A" in name or "lora_B" in name:
                param.copy_(0.3 * noise)
            elif "hra_u" in name:
                param.copy_(noise)


def saved_peft(family: str, config: Any, seed: int, directory: Path
               ) -> tuple[PeftModel, Adapter]:
    peft_model = get_peft_model(tiny_model(family), config)
    randomize(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(directory))
    return peft_model, load_peft_dir(directory)


def lora(**kw: Any) -> LoraConfig:
    return LoraConfig(lora_dropout=0.0, **kw)


LLAMA_ATTN = ["q_proj", "v_proj", "down_proj"]
CASES: dict[str, tuple[str, Any]] = {
    "lora-llama": ("llama", lambda: lora(r=4, lora_alpha=8, target_modules=LLAMA_ATTN)),
    "rslora-patterns-llama": ("llama", lambda: lora(
        r=4, lora_alpha=6, target_modules=LLAMA_ATTN, use_rslora=True,
        rank_pattern={"v_proj": 6, "layers.1.self_attn.q_proj": 2},
        alpha_pattern={"q_proj": 5, "down_proj": 3})),
    "lora-patterns-gpt2": ("gpt2", lambda: lora(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
        rank_pattern={"c_fc": 3}, alpha_pattern={"h.1.attn.c_attn": 2})),
    "dora-patterns-llama": ("llama", lambda: lora(
        r=4, lora_alpha=8, target_modules=LLAMA_ATTN, use_dora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "dora-rslora-gpt2": ("gpt2", lambda: lora(
        r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], use_dora=True,
        use_rslora=True, fan_in_fan_out=True)),
    "hra-odd-llama": ("llama", lambda: HRAConfig(r=3, target_modules=["q_proj", "o_proj"])),
    "hra-gs-llama": ("llama", lambda: HRAConfig(r=4, apply_GS=True,
                                                target_modules=["v_proj", "up_proj"])),
    "hra-gs-odd-qwen2": ("qwen2", lambda: HRAConfig(r=5, apply_GS=True,
                                                    target_modules=["q_proj", "v_proj"])),
    "hra-even-qwen2": ("qwen2", lambda: HRAConfig(r=2, target_modules=["k_proj", "o_proj"])),
}


def partner_config(case: str, family: str) -> Any:
    """A second adapter of another method for the same batch."""
    if case.startswith("lora") or case.startswith("rslora"):
        target = ["c_attn"] if family == "gpt2" else ["k_proj", "o_proj"]
        return lora(r=2, lora_alpha=4, target_modules=target, use_dora=True,
                    fan_in_fan_out=family == "gpt2")
    return lora(r=5, lora_alpha=7, target_modules=["c_attn"] if family == "gpt2"
                else ["q_proj", "up_proj"], fan_in_fan_out=family == "gpt2")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((actual - expected).abs().max())
    assert err <= ATOL, f"{what}: max abs diff {err:.3e} > {ATOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_batch_matches_peft(case: str, tmp_path: Path) -> None:
    family, make = CASES[case]
    peft_a, adapter_a = saved_peft(family, make(), 3, tmp_path / "a")
    peft_b, adapter_b = saved_peft(family, partner_config(case, family), 4, tmp_path / "b")
    ids = input_ids(4, 6, seed=5)
    with torch.no_grad():
        want_a = logits(peft_a, ids)
        want_b = logits(peft_b, ids)
    base = logits(tiny_model(family), ids)  # an untouched copy of the same base
    for want in (want_a, want_b):
        assert float((want - base).abs().max()) > 1e-2, "a PEFT adapter is an identity"

    for budget in (0, 1 << 40):  # segment and gather execution
        model: nn.Module = tiny_model(family)
        pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8, gather_budget=budget))
        pool.load(2, adapter_a)
        pool.load(0, adapter_b)
        slots = [2, 0, -1, 2]
        mixed = pool_logits(pool, model, ids, slots)
        for row, slot in enumerate(slots):
            want = {2: want_a, 0: want_b, -1: base}[slot][row]
            assert_close(mixed[row], want, f"{case}: row {row} slot {slot} budget {budget}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_matches_peft_merge(case: str, tmp_path: Path) -> None:
    family, make = CASES[case]
    peft_model, adapter = saved_peft(family, make(), 6, tmp_path)
    ids = input_ids(2, 5, seed=7)
    want = logits(peft_model.merge_and_unload(), ids)
    assert_close(logits(merged_model(tiny_model(family), adapter), ids), want, case)


def test_converted_pissa_matches_peft(tmp_path: Path) -> None:
    """PiSSA rewrites W0 at init; converted on save it is a rank-2r delta against the
    original W0, which tessera serves on the untouched base."""
    config = lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                  init_lora_weights="pissa")
    peft_model = get_peft_model(tiny_model("llama"), config)
    peft_model.save_pretrained(str(tmp_path / "init"))
    randomize(peft_model, 8)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "out"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    adapter = load_peft_dir(tmp_path / "out")
    ids = input_ids(2, 5, seed=9)
    want = logits(peft_model, ids)
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8))
    pool.load(1, adapter)
    mixed = pool_logits(pool, model, ids, [1, -1])
    assert_close(mixed[0], want[0], "converted PiSSA")
    assert_close(mixed[1], logits(tiny_model("llama"), ids)[1], "base row")
