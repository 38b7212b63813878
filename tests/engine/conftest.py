"""Shared fixtures of the engine tests: the built-in model, an independent reference copy of
it, random adapters of every method, the reference greedy path, and started engines."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from tessera.adapters import Adapter, reference_model
from tessera.engine import builtin
from tessera.engine.core import Engine
from tessera.engine.requests import AdapterSpec
from tessera.engine.sampling import SamplingParams
from tests.factories import FACTORIES
from tests.live import HermeticSettings

# Where the engines under test run (the references always run on the CPU in fp32: tokens
# are compared as lists). scripts/device-check sets "cuda" on a lent GPU machine.
DEVICE = os.environ.get("TESSERA_TEST_DEVICE", "cpu")
METHODS = ("lora", "dora", "hra", "hut", "soka", "bottleneck", "hyperloader")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# Different lengths, so rows of one batch are padded differently; multi-byte UTF-8 too.
PROMPTS = ("hello world", "a", "The quick brown fox jumps", "héllo 世界 🙂", "x = 1\ny = 2",
           "tessera", "Once upon a time, in a land far away", "0123456789")




@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The random variant: the tests compare the engine with an independent reference, for
    # which any weights do; the trained model (tests/engine/test_builtin.py) is slower and
    # ends texts with EOS, which the fixed-length reference greedy loop does not model.
    return builtin.materialise(tmp_path_factory.mktemp("builtin") / "model", "random")


@pytest.fixture(scope="session")
def ref_base(builtin_dir: Path) -> nn.Module:
    """The base model loaded on its own: never wrapped by a slot pool."""
    model: nn.Module = AutoModelForCausalLM.from_pretrained(builtin_dir, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="session")
def ref_tokenizer(builtin_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(builtin_dir, local_files_only=True)


@pytest.fixture(scope="session")
def adapters(ref_base: nn.Module) -> dict[str, Adapter]:
    """One random, non-identity adapter per method (6 methods + a HyperLoader task)."""
    gen = torch.Generator().manual_seed(7)
    return {name: FACTORIES[name](ref_base, gen) for name in METHODS}


class Reference:
    """The independent path: ``tessera.adapters.reference_model`` (plain-torch method forwards on
    a copy of the base) and a greedy loop recomputing the whole sequence each token (no KV
    cache, no padding, no slot pool, no batching)."""

    def __init__(self, base: nn.Module, tokenizer: Any) -> None:
        self.base = base
        self.tokenizer = tokenizer
        # keyed by id(adapter), holding the adapter too: a collected adapter's id can be
        # reused by a new one, which must never find the old one's model or tokens
        self._models: dict[int, tuple[Adapter, nn.Module]] = {}
        self._memo: dict[tuple[int, tuple[int, ...], int], list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def model(self, adapter: Adapter | None) -> nn.Module:
        if adapter is None:
            return self.base
        found = self._models.get(id(adapter))
        if found is None or found[0] is not adapter:
            found = self._models[id(adapter)] = (adapter, reference_model(self.base, adapter))
            self._memo = {k: v for k, v in self._memo.items() if k[0] != id(adapter)}
        return found[1]

    @torch.no_grad()
    def greedy(self, adapter: Adapter | None, prompt: str | list[int], n: int) -> list[int]:
        ids = self.ids(prompt) if isinstance(prompt, str) else list(prompt)
        memo = (id(adapter), tuple(ids), n)
        if memo not in self._memo:
            model, out = self.model(adapter), list[int]()
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids + out])).logits  # [1, T, V]
                out.append(int(logits[0, -1].argmax()))
            self._memo[memo] = out
        return self._memo[memo]

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="session")
def reference(ref_base: nn.Module, ref_tokenizer: Any) -> Reference:
    return Reference(ref_base, ref_tokenizer)


def spec(key: str, adapter: Adapter, calls: list[str] | None = None) -> AdapterSpec:
    """An AdapterSpec whose loader returns ``adapter`` (and records its calls)."""
    async def load() -> Adapter:
        if calls is not None:
            calls.append(key)
        return adapter
    return AdapterSpec(key, load)


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine(builtin_dir: Path) -> AsyncIterator[EngineFactory]:
    """Started engines on the built-in model (on ``DEVICE``, fp32); stopped at teardown."""
    started: list[Engine] = []

    async def make(**overrides: Any) -> Engine:
        values: dict[str, Any] = {"builtin_dir": builtin_dir, "device": DEVICE,
                                  "dtype": "float32", "num_slots": 8, "max_rank": 8,
                                  "max_bottleneck_dim": 16, **overrides}
        engine = Engine(HermeticSettings(**values))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.stop(drain_timeout=5)
