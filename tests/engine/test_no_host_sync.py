"""The engine's packed step reads no device value back while the model runs.

The step the engine's step runner builds (``Stepper._forward``): its KV slab and attention
plan (``BatchCache.packed``: rows of very different lengths, so attention is grouped by
length), a prefill chunk beside the decode tokens, per-token slots of every method — run
on a model and slot pool copied to PyTorch's ``meta`` device, where tensors have no values
and any host read (``.item()``, ``.tolist()``, ``nonzero``) raises. The same step on the
CPU is checked value by value in ``test_engine.py``; here, that nothing in it would make
a GPU's host wait between layers."""

from __future__ import annotations

import torch

from tessera.adapters import registry
from tessera.engine import attention
from tessera.engine.kvcache import BatchCache, ChunkKV
from tests.helpers import meta_twin

META = torch.device("meta")
LENGTHS = [9, 300, 12, 10]  # one long row beside short ones: grouped attention


@torch.no_grad()
def test_a_packed_step_over_the_slab_reads_nothing_back() -> None:
    names = registry.all_names()
    _, (model, pool) = meta_twin(names)
    attention.install(model)
    layers = int(model.config.num_hidden_layers)
    cache = BatchCache(grouped=True)
    for n in LENGTHS:  # each row's prefill, one chunk each (no decode rows yet)
        inputs = cache.packed([], [ChunkKV(0, n, None)], layers, META, torch.float32)
        with pool.use(torch.tensor([[n % len(names)] * n])):
            model(input_ids=torch.zeros(1, n, dtype=torch.long, device=META),
                  position_ids=torch.arange(n, device=META).unsqueeze(0), logits_to_keep=1,
                  **inputs.kwargs())
        cache.add(inputs.chunk_kv(0), n)

    # one step: every row's decode token, then a 20-token prefill chunk of a joining row
    decode, chunk = list(range(len(LENGTHS))), 20
    inputs = cache.packed(decode, [ChunkKV(len(decode), chunk, None)], layers, META,
                          torch.float32)
    assert inputs.plan.groups is not None and len(inputs.plan.groups.groups) > 1  # grouped
    slots = [*range(len(LENGTHS)), *(i % len(names) for i in range(chunk))]  # per token
    keep = [*decode, len(decode) + chunk - 1]  # the rows' logits and the chunk's last
    with pool.use(torch.tensor([slots])):
        out = model(input_ids=torch.zeros(1, len(slots), dtype=torch.long, device=META),
                    position_ids=torch.zeros(1, len(slots), dtype=torch.long, device=META),
                    logits_to_keep=torch.tensor(keep, device=META), **inputs.kwargs())
    assert out.logits.shape == (1, len(keep), model.config.vocab_size)
    cache.advance()
    assert cache.lengths == [n + 1 for n in LENGTHS]
