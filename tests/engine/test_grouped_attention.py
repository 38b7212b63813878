"""The engine's attention (``tessera.engine.attention``): decode attention grouped by row
length (the plan is the cheapest split) and the packed step (decode tokens over the slab,
prefill chunks over their rows' own keys) equal per-token softmax attention written in
plain torch, GQA included; the engine's model runs it."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tessera.adapters.ops import Backend
from tessera.engine import attention
from tessera.engine.attention import cuts, decode_attention, packed_attention, plan
from tessera.engine.kvcache import BatchCache, ChunkKV


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
        self.is_causal = True
        self.layer_idx = 0


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
    span = torch.arange(width).unsqueeze(0)  # [1, W]
    mask = torch.zeros(len(lengths), width).masked_fill(
        span > torch.tensor(lengths).unsqueeze(1), torch.finfo(torch.float32).min)
    want = _reference(query, key, value, lengths)
    for groups in (found, None):  # grouped, and one SDPA over the whole width
        out = decode_attention(_Attention(h // h_kv), query, key, value, mask[:, None, None],
                               groups, scaling=1 / math.sqrt(8))
        assert out.shape == (len(lengths), 1, h, 8)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query over its keys, every head: q [H, D], k/v [H_kv, n, D] -> [H, D] (float64)."""
    h, d = q.shape
    groups = h // k.shape[0]
    out = torch.zeros(h, d, dtype=torch.float64)
    for j in range(h):
        weights = torch.softmax(k[j // groups].double() @ q[j].double() / math.sqrt(d), dim=0)
        out[j] = weights @ v[j // groups].double()
    return out


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("lengths", [[3, 300, 5, 7], [9, 12, 10]])  # grouped, one group
@pytest.mark.parametrize("kernel", ["torch", "triton"])  # Triton: interpreted on a CPU
def test_packed_step_attention_equals_per_token_attention(
        heads: tuple[int, int], lengths: list[int], kernel: Backend) -> None:
    """Decode rows of the slab (their tokens in another order than their slab rows), a
    chunk that starts a row (causal) and one that continues a row (its earlier keys, then
    causal), interleaved in the packed sequence: every token attends to exactly its row's
    keys up to its own position; the slab gets each decode row's new key at its length and
    the chunks' rows their new keys, nothing else. The Triton kernel's decode part needs no
    mask and no plan."""
    h, h_kv = heads
    d = 8
    gen = torch.Generator().manual_seed(1)
    cache = BatchCache(kernel=kernel)
    for n in lengths:
        cache.add([(torch.randn(1, h_kv, n, d, generator=gen),
                    torch.randn(1, h_kv, n, d, generator=gen))], n)
    rows = [(cache.layers[0][0][i, :, :n].clone(), cache.layers[0][1][i, :, :n].clone())
            for i, n in enumerate(lengths)]  # [H_kv, n, D] each, before the step
    past = (torch.randn(1, h_kv, 6, d, generator=gen), torch.randn(1, h_kv, 6, d, generator=gen))
    b = len(lengths)
    # packed: the first chunk's 4 tokens, the decode rows in reverse slab order, the second
    # chunk's 5 tokens
    at = [4 + b - 1 - i for i in range(b)]  # slab row i's packed position
    chunks = [ChunkKV(0, 4, None), ChunkKV(4 + b, 5, [past])]
    tokens = b + 9
    query = torch.randn(1, h, tokens, d, generator=gen)  # [1, H, T, D]
    key = torch.randn(1, h_kv, tokens, d, generator=gen)
    value = torch.randn(1, h_kv, tokens, d, generator=gen)
    inputs = cache.packed(at, chunks, 1, torch.device("cpu"), torch.float32)
    if kernel == "torch":
        assert (inputs.plan.groups is not None) == (max(lengths) > 100)
    else:
        assert inputs.plan.groups is None and inputs.plan.decode_mask is None
    inputs.cache.layers[0].update(key, value)
    out, _ = packed_attention(_Attention(h // h_kv), query, key, value, None,
                              scaling=1 / math.sqrt(d), packed_plan=inputs.plan)
    assert out.shape == (1, tokens, h, d)
    want = torch.zeros(tokens, h, d, dtype=torch.float64)
    for i, (k, v) in enumerate(rows):  # decode: its row's keys, then its new one
        t = at[i]
        want[t] = _softmax_attention(query[0, :, t], torch.cat([k, key[0, :, t:t + 1]], 1),
                                     torch.cat([v, value[0, :, t:t + 1]], 1))
    for q in range(4):  # the first chunk: its own keys up to itself
        want[q] = _softmax_attention(query[0, :, q], key[0, :, :q + 1], value[0, :, :q + 1])
    for q in range(5):  # the second: the row's 6 earlier keys, then its own up to itself
        t = b + 4 + q
        want[t] = _softmax_attention(
            query[0, :, t], torch.cat([past[0][0], key[0, :, b + 4:t + 1]], 1),
            torch.cat([past[1][0], value[0, :, b + 4:t + 1]], 1))
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    slab_k = cache.layers[0][0]
    for i, n in enumerate(lengths):  # written in place at its length, the rest untouched
        torch.testing.assert_close(slab_k[i, :, :n], rows[i][0])
        torch.testing.assert_close(slab_k[i, :, n], key[0, :, at[i]])
    first, second = inputs.chunk_kv(0)[0], inputs.chunk_kv(1)[0]
    torch.testing.assert_close(first[0], key[:, :, :4])
    torch.testing.assert_close(second[0], torch.cat([past[0], key[:, :, b + 4:]], 2))
    assert cache.lengths == lengths  # lengths advance only when the step is taken


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_engine_model_runs_the_packed_attention(builtin_dir: Path,
                                                    implementation: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(builtin_dir),
                                                 attn_implementation=implementation)
    attention.install(model)
    assert model.config._attn_implementation == attention.NAME
