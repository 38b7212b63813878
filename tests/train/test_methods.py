"""Each of the six methods, trained by the code path of ``tessera train`` with its
defaults, learns a demo task the base cannot do: >= 90% held-out exact match where the
base scores <= 10%. Accuracy is measured on the EXPORTED artifact as the server runs it:
read back from disk, validated against the base, lowered into a slot pool and decoded
through the pool's batched path — alone, and with all six adapters (and base rows) mixed
in the same batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.adapters import PoolConfig, SlotPool, artifact
from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter
from tessera.adapters.peft_io import load_peft_dir
from tessera.adapters.reference import base_copy
from tessera.train.base import Base
from tessera.train.data import Example, load_jsonl
from tessera.train.evaluate import exact_match
from tessera.train.export import is_peft_dir
from tests.train.conftest import TASK_OF, TrainedRun, task_files

METHODS = sorted(TASK_OF)
POOL = PoolConfig(num_slots=len(METHODS), max_rank=16, max_bottleneck_dim=64)


def load_export(run: TrainedRun, base: Base) -> Adapter:
    out = run.trained.out
    if is_peft_dir(out):
        return load_peft_dir(out)
    return artifact.load(out, targets=tg.discover(base.model))


def served_accuracy(pool: SlotPool, model: object, base: Base, examples: list[Example],
                    slots: list[int]) -> list[bool]:
    """Per example: correct when decoded through the pool with its row's slot."""
    result = exact_match(model, base.tokenizer, examples,  # type: ignore[arg-type]
                         batch_size=4096, route=lambda rows: pool.use([slots[i] for i in rows]))
    return [p == e.completion for p, e in zip(result.predictions, examples, strict=True)]


def test_the_base_cannot_do_the_tasks(random_base: Base, suite_dir: Path) -> None:
    for task in sorted(set(TASK_OF.values())):
        held_out = load_jsonl(task_files(suite_dir, task).eval)
        assert exact_match(random_base.model, random_base.tokenizer,
                           held_out).accuracy <= 0.10, task


@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_learns_its_task(method: str, random_base: Base,
                                         trained: Callable[[str], TrainedRun]) -> None:
    run = trained(method)
    held_out = load_jsonl(run.files.eval)
    adapter = load_export(run, random_base)
    assert adapter.methods == (method,)
    model = base_copy(random_base.model)
    pool = SlotPool(model, POOL)
    pool.load(1, adapter)
    served = served_accuracy(pool, model, random_base, held_out, [1] * len(held_out))
    base = served_accuracy(pool, model, random_base, held_out, [-1] * len(held_out))
    accuracy, base_accuracy = sum(served) / len(served), sum(base) / len(base)
    trained_eval = run.trained.result.last_eval["exact_match"]
    print(f"{method} on {run.task}: served {accuracy:.3f}, in training "  # noqa: T201
          f"{trained_eval:.3f}, base {base_accuracy:.3f}, "
          f"{run.trained.num_parameters} parameters, {run.seconds:.1f} s")
    assert base_accuracy <= 0.10
    assert accuracy >= 0.90
    assert abs(accuracy - trained_eval) <= 0.01  # serves as it trained


def test_all_methods_in_mixed_batches(random_base: Base,
                                      trained: Callable[[str], TrainedRun]) -> None:
    """Every row of every batch routed to its own method's adapter (or the base): each
    method keeps its solo accuracy within one point."""
    model = base_copy(random_base.model)
    pool = SlotPool(model, POOL)
    examples: list[Example] = []
    slots: list[int] = []
    owner: list[str] = []
    for slot, method in enumerate(METHODS):
        run = trained(method)
        pool.load(slot, load_export(run, random_base))
        held_out = load_jsonl(run.files.eval)[:100]
        examples += held_out
        slots += [slot] * len(held_out)
        owner += [method] * len(held_out)
    base_rows = load_jsonl(trained(METHODS[0]).files.eval)[100:130]
    examples += base_rows
    slots += [-1] * len(base_rows)
    owner += ["base"] * len(base_rows)
    # interleave, so every batch holds rows of several methods
    order = sorted(range(len(examples)), key=lambda i: (i * 7919) % len(examples))
    correct = served_accuracy(pool, model, random_base, [examples[i] for i in order],
                              [slots[i] for i in order])
    by_owner: dict[str, list[bool]] = {}
    for i, ok in zip(order, correct, strict=True):
        by_owner.setdefault(owner[i], []).append(ok)
    for slot, method in enumerate(METHODS):
        rows = [e for e, o in zip(examples, owner, strict=True) if o == method]
        alone = served_accuracy(pool, model, random_base, rows, [slot] * len(rows))
        solo = sum(alone) / len(alone)
        mixed = sum(by_owner[method]) / len(by_owner[method])
        assert mixed >= 0.90 and abs(mixed - solo) <= 0.01, (method, mixed, solo)
    assert sum(by_owner["base"]) / len(by_owner["base"]) <= 0.10
