"""Per-method training defaults (learning rate, size, steps).

One peak learning rate, 3e-3 with AdamW, warm-up and cosine decay, serves every method on
the demo tasks (measured: 1e-2 leaves LoRA at 60% where 3e-3 reaches 100%, 3e-2
diverges), because the trainable tensors share a scale: LoRA/DoRA's ``A``, HUT's ``M_A``,
the bottleneck's ``D`` start kaiming-uniform with a zero partner; HRA moves unit
reflection directions; SoKA's KPSVD terms are large but the step is relative through
Adam. HRA takes 1e-2 (its unit reflection directions turn slowly: 62% after 600 steps at
3e-3, 100% at 1e-2 on ``caesar``), SoKA 5e-3. A new task embedding is one vector whose
coordinates must travel O(1) against a frozen hypernetwork: 3e-1 (from a random start
3e-2 and 1e-1 stay at 0%, 3e-1 reaches 100% in 300 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


@dataclass(frozen=True)
class MethodDefaults:
    lr: float
    rank: int  # r (lora/dora/hra/hut), max terms (soka), bottleneck width
    steps: int


DEFAULTS: dict[str, MethodDefaults] = {
    "lora": MethodDefaults(lr=3e-3, rank=8, steps=600),
    "dora": MethodDefaults(lr=3e-3, rank=8, steps=600),
    "hra": MethodDefaults(lr=1e-2, rank=8, steps=600),
    "hut": MethodDefaults(lr=3e-3, rank=8, steps=600),
    "soka": MethodDefaults(lr=5e-3, rank=8, steps=600),
    "bottleneck": MethodDefaults(lr=3e-3, rank=8, steps=600),
    "hyperloader": MethodDefaults(lr=3e-3, rank=4, steps=800),
    "task-embedding": MethodDefaults(lr=3e-1, rank=4, steps=300),
}


def defaults(method: str) -> MethodDefaults:
    try:
        return DEFAULTS[method]
    except KeyError:
        raise ValueError(f"no training defaults for method {method!r} "
                         f"(known: {', '.join(DEFAULTS)})") from None


def default_targets(module_names: set[str]) -> list[str]:
    """Every projection of the decoder blocks, in the base's own naming."""
    return GPT2_LINEAR if "c_attn" in module_names else ALL_LINEAR
