"""Checkpoints and --resume: a run interrupted (Ctrl-C between steps) and resumed ends with
bit-identical weights and artifact bytes to an uninterrupted run; a checkpoint of a run
with other settings is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tessera.train import checkpoint
from tessera.train.base import Base
from tessera.train.finetune import AdapterOptions, RunOptions, train_adapter
from tessera.train.hyperloader import HyperOptions, train_hyperloader
from tests.train.conftest import task_files

STEPS, INTERRUPT_AT = 12, 7  # 7: not a multiple of checkpoint_every, so Ctrl-C saves it


def interrupt_at(step: int) -> Callable[[int], None]:
    def hook(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt
    return hook


def run_opts(resume: bool = False) -> RunOptions:
    return RunOptions(steps=STEPS, batch_size=8, checkpoint_every=4, resume=resume, seed=11)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()
            and p.name != "training.json"}


@pytest.mark.parametrize("method", ["lora", "hra", "soka"])
def test_resume_equals_uninterrupted(random_base: Base, suite_dir: Path, tmp_path: Path,
                                     one_thread: None, method: str) -> None:
    files = task_files(suite_dir, "caesar", n_train=200, n_eval=20)
    opts = AdapterOptions(method=method, rank=4)
    whole = train_adapter(opts, run_opts(), random_base, files.train, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_adapter(opts, run_opts(), random_base, files.train, tmp_path / "cut",
                      on_step=interrupt_at(INTERRUPT_AT))
    saved = checkpoint.load(tmp_path / "cut" / "checkpoint", _fingerprint_of(tmp_path / "cut"))
    assert saved.step == INTERRUPT_AT
    resumed = train_adapter(opts, run_opts(resume=True), random_base, files.train,
                            tmp_path / "cut")
    for a, b in zip(whole.adapter.components, resumed.adapter.components, strict=True):
        for path, tensors in a.modules.items():
            for name, tensor in tensors.items():
                assert torch.equal(tensor, b.modules[path][name]), f"{path}.{name}"
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "cut")


def _fingerprint_of(out: Path) -> str:
    return str(json.loads((out / "checkpoint" / checkpoint.META_FILE).read_text())
               ["fingerprint"])


def test_hyperloader_resume_equals_uninterrupted(random_base: Base, suite_dir: Path,
                                                 tmp_path: Path, one_thread: None) -> None:
    data = {name: task_files(suite_dir, name, n_train=200, n_eval=20).train
            for name in ("upper", "rot13")}
    opts = HyperOptions(task_dim=8, hidden_dim=16, projector_dim=8)
    whole = train_hyperloader(opts, run_opts(), random_base, data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_hyperloader(opts, run_opts(), random_base, data, tmp_path / "cut",
                          on_step=interrupt_at(5))
    resumed = train_hyperloader(opts, run_opts(resume=True), random_base, data,
                                tmp_path / "cut")
    for name, tensor in whole.hypernet.weights.items():
        assert torch.equal(tensor, resumed.hypernet.weights[name]), name
    for name, z in whole.hypernet.tasks.items():
        assert torch.equal(z, resumed.hypernet.tasks[name]), name
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "cut")


def test_resume_with_other_settings_is_refused(random_base: Base, suite_dir: Path,
                                               tmp_path: Path, one_thread: None) -> None:
    files = task_files(suite_dir, "caesar", n_train=200, n_eval=20)
    opts = AdapterOptions(method="lora", rank=4)
    short = RunOptions(steps=2, batch_size=8)
    train_adapter(opts, short, random_base, files.train, tmp_path / "out")
    other = short.model_copy(update={"lr": 0.5, "resume": True})
    with pytest.raises(checkpoint.CheckpointError, match="other settings"):
        train_adapter(opts, other, random_base, files.train, tmp_path / "out")
