"""vLLM's runtime LoRA endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``)
mapped onto tessera's upload + activate, for the calling tenant: loading ``lora_name``
from ``lora_path`` uploads the folder's adapter as a new version of the tenant's adapter
``lora_name`` (validated against the base like any upload) and binds the task
``lora_name`` to it, so that ``model: lora_name`` serves it; unloading unbinds the task
(the stored versions stay).

``lora_path`` is read from the server's filesystem, so only from under the configured
adapter root (``TESSERA_LORA_ADAPTER_ROOT``; unset = both endpoints answer 403):

* the path (absolute, or relative to the root) is resolved -- every symlink followed,
  every ``..`` applied -- and must lie inside the resolved root, or it is refused (400)
  whether or not it exists, so the answer tells nothing about paths outside the root;
* the two files read (``adapter_config.json``, ``adapter_model.safetensors``) are resolved
  and checked the same way (a symlink inside the folder that leaves the root is refused),
  opened without following a last symlink and without blocking (a FIFO is no file), and
  must be regular files no larger than the upload limit (413) before a byte is read;
* safetensors only: a folder whose weights are pickle-based (``adapter_model.bin``...)
  is 415, as an upload is.

The root is trusted as a whole (operators write it); a path swapped for a symlink between
the check and the open is refused at the open when it is the file itself.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

from tessera.adapters.errors import AdapterValidationError, UnsafeFormatError
from tessera.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME
from tessera.adapters.safeio import UNSAFE_SUFFIXES
from tessera.server.http_errors import ApiError, not_found
from tessera.server.service import Service
from tessera.server.uploads import from_files, too_large
from tessera.store.errors import NotFoundError


def disabled() -> ApiError:
    return ApiError(403, "forbidden", "loading LoRA adapters from the server's filesystem is "
                    "disabled: the server has no adapter root (TESSERA_LORA_ADAPTER_ROOT)")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _escapes(lora_path: str) -> ApiError:
    return ApiError(400, "invalid_path", f"lora_path {lora_path[:200]!r} is not inside the "
                    "server's adapter root", field="lora_path")


def read_adapter_dir(root: Path, lora_path: str, limit: int) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` of the folder ``lora_path``
    under ``root`` (see the module's rules). Blocking: call it in a worker thread."""
    if "\x00" in lora_path:
        raise ApiError(400, "invalid_path", "lora_path holds a NUL character",
                       field="lora_path")
    base = os.path.realpath(root)
    if not os.path.isdir(base):
        raise ApiError(503, "unavailable", "the server's adapter root is not a directory")
    folder = os.path.realpath(os.path.join(base, lora_path))  # absolute paths replace base
    if not _inside(folder, base):
        raise _escapes(lora_path)
    if not os.path.isdir(folder):
        raise not_found(f"lora_path {lora_path[:200]!r} is no folder under the adapter root")
    if not os.path.lexists(os.path.join(folder, WEIGHTS_NAME)):
        unsafe = sorted(name for name in os.listdir(folder)
                        if name.lower().endswith(UNSAFE_SUFFIXES))
        if unsafe:
            raise UnsafeFormatError(f"{unsafe[0]}: pickle-based weight files are refused "
                                    f"and were not loaded; provide {WEIGHTS_NAME}")
    return (_read(base, folder, CONFIG_NAME, lora_path, limit),
            _read(base, folder, WEIGHTS_NAME, lora_path, limit))


def _read(base: str, folder: str, name: str, lora_path: str, limit: int) -> bytes:
    """One regular file of the folder, checked to stay inside ``base``, sized first."""
    path = os.path.join(folder, name)
    if not _inside(os.path.realpath(path), base):
        raise _escapes(f"{lora_path}/{name}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise AdapterValidationError(f"the folder has no {name}", tensor=name) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink since it was checked
            raise _escapes(f"{lora_path}/{name}") from None
        raise ApiError(400, "invalid_path", f"{name} cannot be read: {exc.strerror}",
                       field="lora_path") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(400, "invalid_path", f"{name} is not a regular file",
                           field="lora_path")
        if info.st_size > limit:
            raise too_large(limit)
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since fstat
        raise too_large(limit)
    return data


async def load(service: Service, tenant: str, name: str, lora_path: str, *,
               in_place: bool) -> None:
    """Upload the folder as a new version of adapter ``name`` and bind task ``name`` to it.
    A task already bound is 400 unless ``in_place`` (vLLM's rule); two loads racing for
    a new name: one wins, the other is 409."""
    root = service.settings.lora_adapter_root
    if root is None:
        raise disabled()
    store = service.store
    revision = await store.task_revision(tenant, name)
    if not in_place and await store.get_binding(tenant, name) is not None:
        raise ApiError(400, "already_loaded", f"the LoRA adapter {name!r} has already been "
                       "loaded; send load_inplace: true to replace it", field="lora_name")
    config, weights = await asyncio.to_thread(read_adapter_dir, root, lora_path,
                                              service.settings.max_upload_bytes)
    upload = await asyncio.to_thread(from_files, config, weights)
    record = await service.upload(tenant, name, upload)
    await service.store.activate(tenant, name, name, record.version, actor=tenant,
                                 expected_revision=None if in_place else revision)


async def unload(service: Service, tenant: str, name: str) -> None:
    """Unbind task ``name`` (404 when it is not bound)."""
    if service.settings.lora_adapter_root is None:
        raise disabled()
    try:
        await service.store.deactivate(tenant, name, actor=tenant)
    except NotFoundError:
        raise not_found(f"the LoRA adapter {name!r} is not loaded") from None
