"""``tessera train --upload URL``: send a trained adapter to a running server and bind a
task to it, through :class:`tessera.server.client.TesseraClient` (no torch needed here).

A PEFT folder is sent as an archive of its two files, tessera's artifact as its manifest
and weights; the new version is then activated for ``task``. HyperLoader hypernetworks are
not uploaded here: the client has no hypernetwork calls yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tessera.server.client import AdapterVersion, Task, TesseraClient

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
TESSERA_FILES = ("manifest.json", "weights.safetensors")


@dataclass(frozen=True)
class Uploaded:
    version: AdapterVersion
    task: Task


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
