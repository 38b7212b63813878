"""The engine's packed step reads no device value back while the model runs.

The step the engine's step runner builds (``Stepper._forward``): its KV slab and attention
plan (``BatchCache.packed``: rows of very different lengths, so attention is grouped by
length), its inputs uploaded from host lists, a prefill chunk beside the decode tokens,
per-token slots of every method — run on a model and slot pool copied to PyTorch's
``meta`` device, where tensors have no values and any host read (``.item()``,
``.tolist()``, ``nonzero``) raises. Where the engine tests run on CUDA
(``scripts/device-check``), the same step runs on the GPU with CUDA's synchronisation
check set to raise from the step's inputs to its logits (a blocking copy to the device
included). The step's values are checked in ``test_engine.py``; here, that nothing in it
makes the host wait: the step's one wait is its sampled tokens' transfer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tessera.adapters import registry
from tessera.adapters.ops import Backend
from tessera.adapters.plan import on_device
from tessera.engine import attention
from tessera.engine.kvcache import BatchCache, ChunkKV
from tests.engine.conftest import DEVICE
from tests.helpers import meta_twin

WHERE = torch.device("cuda" if DEVICE == "cuda" else "meta")
LENGTHS = [9, 300, 12, 10]  # one long row beside short ones: grouped attention


@contextmanager
def no_reads() -> Iterator[None]:
    """On CUDA: any synchronisation inside the block raises; on ``meta`` any read does."""
    if WHERE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Triton kernels (the pool's and the decode attention's) run on CUDA only, not on ``meta``
KERNELS: list[Backend] = ["torch", "triton"] if WHERE.type == "cuda" else ["torch"]


@torch.no_grad()
@pytest.mark.parametrize("kernel", KERNELS)
def test_a_packed_step_over_the_slab_reads_nothing_back(kernel: Backend) -> None:
    names = registry.all_names()
    _, (model, pool) = meta_twin(names, device=str(WHERE), kernels=kernel)
    attention.install(model)
    layers = int(model.config.num_hidden_layers)
    cache = BatchCache(grouped=True, kernel=kernel)
    for n in LENGTHS:  # each row's prefill, one chunk each (no decode rows yet)
        inputs = cache.packed([], [ChunkKV(0, n, None)], layers, WHERE, torch.float32)
        with pool.use(torch.tensor([[n % len(names)] * n])):
            model(input_ids=torch.zeros(1, n, dtype=torch.long, device=WHERE),
                  position_ids=torch.arange(n, device=WHERE).unsqueeze(0), logits_to_keep=1,
                  **inputs.kwargs())
        cache.add(inputs.chunk_kv(0), n)

    # one step: every row's decode token, then a 20-token prefill chunk of a joining row;
    # its inputs built as the step runner builds them (host lists, uploaded), the cache's
    # attention plan and the forward all inside the check
    decode, chunk = list(range(len(LENGTHS))), 20
    slots = [*range(len(LENGTHS)), *(i % len(names) for i in range(chunk))]  # per token
    keep = [*decode, len(decode) + chunk - 1]  # the rows' logits and the chunk's last
    with no_reads():
        inputs = cache.packed(decode, [ChunkKV(len(decode), chunk, None)], layers, WHERE,
                              torch.float32)
        with pool.use(torch.tensor([slots])):
            out = model(input_ids=on_device([[0] * len(slots)], WHERE),
                        position_ids=on_device([list(range(len(slots)))], WHERE),
                        logits_to_keep=on_device(keep, WHERE), **inputs.kwargs())
    if kernel == "torch":  # grouped by length; the Triton kernel needs no plan
        assert inputs.plan.groups is not None and len(inputs.plan.groups.groups) > 1
    assert out.logits.shape == (1, len(keep), model.config.vocab_size)
    cache.advance()
    assert cache.lengths == [n + 1 for n in LENGTHS]
