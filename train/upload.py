"""``tessera train --upload URL``: send what was trained to a running server and bind tasks
to it, through :class:`tessera.server.client.TesseraClient` (no torch needed here).

* An adapter: a PEFT folder is sent as an archive of its two files, tessera's artifact as
  its manifest and weights; the new version is activated for one task.
* A HyperLoader (:func:`upload_hypernetwork`): the hypernetwork artifact (manifest and
  weights, its trained task embeddings inside) becomes a new version of a hypernetwork,
  and each of its tasks ``T`` is served as the task ``PREFIX-T`` (:func:`served_task`).
* A new task embedding (:func:`add_task`): registered on a hypernetwork version already on
  the server (by default its latest) and served as ``PREFIX-T``. An embedding only means
  something to the hypernetwork it was trained against, so the server's version is first
  checked to be that one (same weights file, by sha256).

``tessera demo`` installs its shipped adapters with the same functions (prefix ``hyper``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tessera.server.client import (
    HYPERNETWORK_FILES,
    AdapterVersion,
    HypernetworkVersion,
    Task,
    TesseraClient,
)

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
TESSERA_FILES = ("manifest.json", "weights.safetensors")
EMBEDDING_FILE = "embedding.safetensors"  # tessera.train.hyperloader.train_task_embedding's


@dataclass(frozen=True)
class Uploaded:
    version: AdapterVersion
    task: Task


@dataclass(frozen=True)
class UploadedHyper:
    hypernetwork: HypernetworkVersion  # the version as stored, with its registered tasks
    tasks: dict[str, Task]  # HyperLoader task -> the binding of the task serving it


def served_task(prefix: str, hyper_task: str) -> str:
    """The task that serves HyperLoader task ``hyper_task``: ``<prefix>-<hyper_task>``."""
    return f"{prefix}-{hyper_task}"


def upload_and_activate(client: TesseraClient, folder: Path, name: str, task: str) -> Uploaded:
    if all((folder / f).is_file() for f in PEFT_FILES):
        version = client.upload(name, folder)
    elif all((folder / f).is_file() for f in TESSERA_FILES):
        version = client.upload_files(name, folder / TESSERA_FILES[0],
                                      folder / TESSERA_FILES[1])
    else:
        raise ValueError(f"{folder} holds neither a PEFT adapter nor a tessera artifact")
    bound = client.activate(task, name, version["version"])
    return Uploaded(version, bound)


def _bind(client: TesseraClient, record: HypernetworkVersion, hyper_tasks: Iterable[str],
          prefix: str) -> dict[str, Task]:
    return {t: client.activate_hyper(served_task(prefix, t), record["name"],
                                     record["version"], t) for t in hyper_tasks}


def upload_hypernetwork(client: TesseraClient, folder: Path, name: str,
                        prefix: str) -> UploadedHyper:
    """``folder``'s hypernetwork as a new version of ``name``; every task registered in it
    bound as ``<prefix>-<task>``."""
    record = client.upload_hypernetwork(name, folder)
    return UploadedHyper(record, _bind(client, record, record["tasks"], prefix))


def find_version(client: TesseraClient, hypernetwork: str,
                 version: int | None) -> HypernetworkVersion:
    """``hypernetwork`` ``version`` as the server has it (None: its latest version)."""
    if version is not None:
        return client.hypernetwork_version(hypernetwork, version)
    return max(client.hypernetwork(hypernetwork)["versions"], key=lambda v: v["version"])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_task(client: TesseraClient, embedding: Path, hypernetwork: str, version: int | None,
             task: str, prefix: str, *, trained_against: Path | None = None) -> UploadedHyper:
    """Register ``embedding`` as HyperLoader task ``task`` of ``hypernetwork`` ``version``
    (None: the latest) and bind ``<prefix>-<task>`` to it. ``trained_against``: the
    hypernetwork folder the embedding was trained with; ValueError unless the server's
    version holds the same weights."""
    record = find_version(client, hypernetwork, version)
    if trained_against is not None:
        want = file_sha256(trained_against / HYPERNETWORK_FILES[1])
        if record["sha256"] != want:
            raise ValueError(
                f"hypernetwork {hypernetwork!r} v{record['version']} on the server is not the "
                f"one the embedding was trained against ({trained_against}): weights sha256 "
                f"{record['sha256'][:12]}… there, {want[:12]}… here; an embedding only works "
                "with its own hypernetwork (upload that one, or name its version with "
                "NAME@VERSION)")
    record = client.register_hyper_task(hypernetwork, record["version"], task, embedding)
    return UploadedHyper(record, _bind(client, record, [task], prefix))
