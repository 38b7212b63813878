"""Tiny Hugging Face causal LMs built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 96


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               layers: int = 2) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4)
    model: PreTrainedModel
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48,
                                             num_key_value_heads=2, **common))
    elif family == "qwen2":  # has q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=48,
                                             num_key_value_heads=2, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=48,
                                                 num_key_value_heads=2, **common))
    elif family == "gpt2":  # Conv1D projections with biases
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers,
                                           n_head=4, bos_token_id=0, eos_token_id=0))
        with torch.no_grad():  # GPT-2 inits biases to zero: make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.02)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def input_ids(batch: int, length: int, *, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)
