"""Shared fixtures of the training tests: the bases, the demo task files, and adapters
trained once per session by the code path of ``tessera train`` (shared by every test that
needs one; the accuracy, export and serving tests reuse the same runs).

Thread count: the models are tiny, so per-op threading overhead dominates; the runs use one
torch thread (measured faster than two on the 2-core CI machine) and restore the setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tessera.engine import builtin
from tessera.train import tasks
from tessera.train.base import Base, load_base
from tessera.train.finetune import AdapterOptions, RunOptions, TrainedAdapter, train_adapter
from tessera.train.hyperloader import HyperOptions, TrainedHyper, train_hyperloader


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """``tessera train`` configures the root logger (as a process would): restore it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def random_base() -> Base:
    """The random-weight built-in variant: for tests of the mechanics (any weights do)."""
    return load_base(builtin.materialise(variant="random"))


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite")


def task_files(suite_dir: Path, name: str, n_train: int = 2000,
               n_eval: int = 200) -> tasks.TaskFiles:
    return tasks.write_suite(suite_dir, [name], n_train=n_train, n_eval=n_eval)[name]


# --- adapters trained once per session ------------------------------------------------------
# One demo task per method (different tasks, so a mixed batch of these adapters is a batch
# of different tasks); every run uses the method's defaults of `tessera train`.
TASK_OF = {"lora": "rot13", "dora": "upper", "hra": "caesar", "hut": "atbash",
           "soka": "upper", "bottleneck": "rot13"}
HYPER_TASKS = ("upper", "rot13", "caesar")


@dataclass
class TrainedRun:
    method: str
    task: str
    files: tasks.TaskFiles
    trained: TrainedAdapter
    seconds: float  # wall time of the run, export included


@pytest.fixture(scope="session")
def trained(random_base: Base, suite_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            one_thread: None) -> Callable[[str], TrainedRun]:
    """``trained(method)``: that method's adapter, trained on first use and then shared."""
    runs: dict[str, TrainedRun] = {}

    def get(method: str) -> TrainedRun:
        if method not in runs:
            files = task_files(suite_dir, TASK_OF[method])
            out = tmp_path_factory.mktemp(f"trained-{method}")
            start = time.perf_counter()
            result = train_adapter(AdapterOptions(method=method), RunOptions(), random_base,
                                   files.train, out, files.eval)
            runs[method] = TrainedRun(method, TASK_OF[method], files, result,
                                      time.perf_counter() - start)
        return runs[method]

    return get


@dataclass
class HyperRun:
    trained: TrainedHyper
    files: dict[str, tasks.TaskFiles]
    seconds: float


@pytest.fixture(scope="session")
def hyper(random_base: Base, suite_dir: Path, tmp_path_factory: pytest.TempPathFactory,
          one_thread: None) -> HyperRun:
    """A HyperLoader trained multi-task on HYPER_TASKS with the defaults of ``tessera
    train hyperloader``."""
    files = {name: task_files(suite_dir, name) for name in HYPER_TASKS}
    start = time.perf_counter()
    result = train_hyperloader(HyperOptions(), RunOptions(), random_base,
                               {n: f.train for n, f in files.items()},
                               tmp_path_factory.mktemp("hyperloader"),
                               {n: f.eval for n, f in files.items()})
    return HyperRun(result, files, time.perf_counter() - start)
