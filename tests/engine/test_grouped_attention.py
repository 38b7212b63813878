"""Decode attention grouped by row length (``tessera.engine.attention``): the plan is the
cheapest split, and attention through it equals per-row softmax attention written in plain
torch, GQA included; the engine's model runs it."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tessera.engine import attention
from tessera.engine.attention import cuts, plan, slab_attention


def _cost(widths: list[int], base: int, ends: list[int], group_cost: int) -> int:
    """Positions read: every row over the base width, gathered rows twice their width."""
    b = len(widths)
    total = b * widths[base - 1]
    start = base
    for end in ends:
        total += 2 * (end - start) * widths[end - 1] + group_cost
        start = end
    return total


def _every_split(b: int) -> list[tuple[int, list[int]]]:
    splits: list[tuple[int, list[int]]] = []
    for base in range(1, b + 1):
        inner = range(base + 1, b)
        for k in range(len(inner) + 1):
            for chosen in itertools.combinations(inner, k):
                splits.append((base, [*chosen, b] if base < b else []))
    return splits


@pytest.mark.parametrize("seed", range(30))
def test_the_plan_is_the_cheapest_split(seed: int) -> None:
    rng = random.Random(seed)
    b = rng.randint(1, 7)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(100, 1200)]) for _ in range(b)]
    widths = sorted(n + 1 for n in lengths)
    base, ends = cuts(lengths, group_cost=64)
    best = min(_cost(widths, s, e, 64) for s, e in _every_split(b))
    assert _cost(widths, base, ends, 64) == best
    assert not ends or ends[-1] == b


def test_similar_rows_run_as_one_group_and_a_long_row_alone() -> None:
    cpu, f32 = torch.device("cpu"), torch.float32
    assert plan([100, 120, 90, 130], cpu, f32) is None  # one view, plain SDPA
    found = plan([10, 12, 1000, 11], cpu, f32)
    assert found is not None
    base, long = found.groups
    assert base.rows is None and base.width == 13  # every row over the short width
    assert long.rows is not None and long.rows.tolist() == [2] and long.width == 1001


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
    """Row by row, head by head: softmax(q k^T / sqrt(D)) v over the row's own positions
    ``[0, length]``. query [B, H, 1, D], key/value [B, H_kv, W, D] -> [B, 1, H, D]."""
    b, h, _, d = query.shape
    groups = h // key.shape[1]
    out = torch.zeros(b, 1, h, d, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for j in range(h):
            q = query[i, j, 0].double()  # [D]
            k = key[i, j // groups, :n + 1].double()  # [n + 1, D]
            v = value[i, j // groups, :n + 1].double()
            weights = torch.softmax(k @ q / math.sqrt(d), dim=0)  # [n + 1]
            out[i, 0, j] = weights @ v
    return out


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_grouped_attention_equals_per_row_attention(heads: tuple[int, int]) -> None:
    h, h_kv = heads
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 40, 5, 300, 7, 6, 280]
    width = max(lengths) + 1
    query = torch.randn(len(lengths), h, 1, 8, generator=gen)  # [B, H, 1, D]
    slab_k = torch.randn(len(lengths) + 2, h_kv, width + 20, 8, generator=gen)  # [R, H, C, D]
    slab_v = torch.randn(len(lengths) + 2, h_kv, width + 20, 8, generator=gen)
    key, value = slab_k[:len(lengths), :, :width], slab_v[:len(lengths), :, :width]  # views
    found = plan(lengths, torch.device("cpu"), torch.float32)
    assert found is not None and len(found.groups) >= 2
    out, _ = slab_attention(_Attention(h // h_kv), query, key, value, None,
                            scaling=1 / math.sqrt(8), slab_plan=found)
    assert out.shape == (len(lengths), 1, h, 8)
    torch.testing.assert_close(out.double(), _reference(query, key, value, lengths),
                               atol=1e-5, rtol=1e-5)


def test_the_engine_model_runs_the_grouped_attention_where_it_runs_sdpa(
        builtin_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(builtin_dir))
    assert attention.install(model)
    assert model.config._attn_implementation == attention.NAME
    eager = AutoModelForCausalLM.from_pretrained(str(builtin_dir), attn_implementation="eager")
    assert not attention.install(eager)  # other implementations are left alone
    assert eager.config._attn_implementation == "eager"
