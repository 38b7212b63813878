"""The shipped demo adapters (``train/demo_assets/``): safetensors and JSON only, small, made
for the built-in model as it ships now, loadable the way an upload is parsed; the new task
embedding beside the hypernetwork it was trained against; the demo's exact-match rule on
generated text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.adapters import artifact
from tessera.adapters import targets as tg
from tessera.adapters.peft_io import load_peft_dir
from tessera.adapters.safeio import looks_pickled, read_safetensors
from tessera.engine import builtin
from tessera.train import tasks
from tessera.train.demo_client import prediction
from tessera.train.demo_suite import ASSETS, MANIFEST, load_manifest

TOTAL_LIMIT = 1024 * 1024  # bytes: small beside the 2.5 MB base they adapt


def test_assets_are_safetensors_and_json_only_and_small() -> None:
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    assert sum(p.stat().st_size for p in files) < TOTAL_LIMIT
    for path in files:
        if path.suffix == ".safetensors":
            data = path.read_bytes()
            assert not looks_pickled(data), path  # the server would refuse the upload
            read_safetensors(data, what=str(path))
        else:
            json.loads(path.read_text())


def test_manifest_matches_the_shipped_base_and_folders() -> None:
    manifest = load_manifest(ASSETS)
    assert manifest.base.name == builtin.TRAINED_NAME
    assert manifest.base.sha256 == builtin.trained_manifest()["sha256"]
    assert [a.method for a in manifest.adapters] == ["lora", "dora", "hra", "hut", "soka",
                                                     "bottleneck"]
    assert len(manifest.hyperloader.tasks) >= 3
    for entry in manifest.adapters:
        assert (ASSETS / entry.folder).is_dir(), entry.folder
        assert entry.accuracy >= 0.9, entry  # measured in-process at build time
    assert min(manifest.hyperloader.accuracy.values()) >= 0.9
    listed = {MANIFEST} | {a.folder for a in manifest.adapters} | {manifest.hyperloader.folder}
    assert {p.name for p in ASSETS.iterdir()} == listed


def test_each_adapter_parses_as_an_upload_would(tmp_path: Path) -> None:
    base = builtin.materialise(tmp_path / "model", "trained")
    from tessera.train.base import load_base

    targets = tg.discover(load_base(base).model)
    manifest = load_manifest(ASSETS)
    for entry in manifest.adapters:
        folder = ASSETS / entry.folder
        if (folder / "adapter_config.json").is_file():
            adapter = load_peft_dir(folder)
        else:
            adapter = artifact.load(folder, targets=targets)
        assert adapter.methods == (entry.method,)
    hyper = artifact.load_hypernetwork(ASSETS / manifest.hyperloader.folder)
    assert set(hyper.tasks) == set(manifest.hyperloader.tasks)


def test_the_new_task_embedding_is_shipped_for_the_shipped_hypernetwork() -> None:
    """The HyperLoader way to add a task: one embedding, trained against the frozen,
    shipped hypernetwork (a new dataset of a learned skill), from a random start that
    scored 0% to >= 80% held out; it registers as the server's register-task route would."""
    hyper = load_manifest(ASSETS).hyperloader
    new = hyper.new_task
    assert new is not None
    assert new.task not in hyper.tasks and new.task in tasks.TASKS
    assert new.accuracy >= 0.80 and new.start_accuracy <= 0.10 and new.init == "random"
    assert "new dataset of a learned skill" in new.description
    path = ASSETS / new.embedding
    assert path.parent == ASSETS / hyper.folder
    assert path.name == f"{new.task}.embedding.safetensors"
    (embedding,) = read_safetensors(path.read_bytes(), what=str(path))[0].values()
    assert embedding.dtype == getattr(torch, new.dtype)
    hypernet = artifact.load_hypernetwork(ASSETS / hyper.folder)
    assert new.task not in hypernet.tasks  # the hypernetwork's files were not rewritten
    hypernet.register_task(new.task, embedding)  # shape [task_dim], finite
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["manifest.json", "weights.safetensors", path.name])


@pytest.mark.parametrize(("text", "want"), [
    ("OLLEH\n", "OLLEH\n"), ("OLLEH\nxx", "OLLEH\n"), ("OLL\nEH\n", "OLL\n"),
    ("OLLEH", "OLLEH"), ("", ""), ("\n", "\n"),
])
def test_prediction_stops_after_the_first_newline(text: str, want: str) -> None:
    assert prediction(text) == want

