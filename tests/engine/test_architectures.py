"""The engine on every supported architecture (Llama is the built-in model; here GPT-2,
Qwen2 and Mistral, tiny, random weights): batched prefill of rows of different lengths,
decode over the in-place KV slabs, rows joining late, and a LoRA adapter on some rows —
every row equals a plain greedy loop on the same model (no cache, no batching)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    MistralConfig,
    PreTrainedConfig,
    Qwen2Config,
)

from tessera.adapters import Adapter, Component, reference_model
from tessera.adapters.methods.lora import LoraConfig
from tessera.engine import AdapterSpec, Engine, GenerationRequest, SamplingParams
from tests.engine.conftest import DEVICE
from tests.factories.lora import lora_modules
from tests.live import HermeticSettings

PROMPTS = ([5, 9, 14, 3], [7] * 11, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
TOKENS = 6


def config_of(kind: str, vocab: int) -> PreTrainedConfig:
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    common: dict[str, Any] = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "max_position_embeddings": 256}
    if kind == "qwen2":
        return Qwen2Config(**common)
    return MistralConfig(**common, sliding_window=None)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral"])
async def test_every_architecture_matches_a_plain_greedy_loop(
        kind: str, builtin_dir: Path, tmp_path: Path) -> None:
    vocab = 300
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(kind, vocab)).eval()
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_dir / name, tmp_path / name)
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=targets)
    lora = Adapter((Component("lora", config, lora_modules(
        model, config, torch.Generator().manual_seed(3))),))

    def greedy(adapter: Adapter | None, prompt: list[int]) -> list[int]:
        net = model if adapter is None else reference_model(model, adapter)
        ids: list[int] = []
        with torch.no_grad():
            for _ in range(TOKENS):
                logits = net(input_ids=torch.tensor([prompt + ids])).logits  # [1, T, V]
                ids.append(int(logits[0, -1].argmax()))
        return ids

    engine = Engine(HermeticSettings(model=str(tmp_path), device=DEVICE, dtype="float32",
                                     num_slots=2, max_rank=8, hot_merge=False))
    await engine.start()
    try:
        async def load() -> Adapter:
            return lora
        spec = AdapterSpec("lora", load)
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
        await engine.submit(GenerationRequest(prompt=[1, 2], adapter=spec,  # resident
                                              sampling=params)).result()
        jobs = [(p, spec if i == 1 else None) for i, p in enumerate(PROMPTS)]
        handles = [engine.submit(GenerationRequest(prompt=p, adapter=a, sampling=params))
                   for p, a in jobs]
        await asyncio.sleep(0.05)  # one more row joins while the others decode
        late = engine.submit(GenerationRequest(prompt=PROMPTS[2][:9], adapter=spec,
                                               sampling=params))
        results = await asyncio.gather(*(h.result() for h in [*handles, late]))
    finally:
        await engine.stop(drain_timeout=5)
    for (prompt, adapter), result in zip([*jobs, (PROMPTS[2][:9], spec)], results,
                                         strict=True):
        want = greedy(lora if adapter is not None else None, prompt)
        assert result.token_ids == want, (kind, prompt)
