"""The admin key of a first run: a server started with no ``TESSERA_ADMIN_KEY`` generates
one, keeps it in a file only its user can read, and reuses it on later starts — so a fresh
machine can create its first tenant instead of meeting 401s.

The file is ``TESSERA_ADMIN_KEY_FILE`` if set, else ``admin.key`` beside the embedded
Redis's data directory (``TESSERA_STORE_DATA_DIR``'s parent: the user data directory by
default, ``/data`` in the container image).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from tessera.server.client import DEFAULT_URL
from tessera.store.tenants import new_api_key

if TYPE_CHECKING:
    from tessera.server.server_settings import ServerSettings

log = logging.getLogger("tessera.admin_key")

ENV = "TESSERA_ADMIN_KEY_FILE"


class AdminKeyError(Exception):
    """The key file exists but holds no usable key, or cannot be read or created."""


def ensure_admin_key(settings: ServerSettings, environ: Mapping[str, str], *,
                     url: str) -> ServerSettings:
    """``settings`` with an admin key: its own if configured, else the key file's (created
    on the first start, and then announced once with the command to run next against
    ``url``)."""
    if settings.admin_key is not None:
        return settings
    path = key_file(settings.store.data_dir, environ)
    key, created = load_or_create(path)
    if created:
        target = "" if url == DEFAULT_URL else f"TESSERA_URL={url} "
        log.warning("no admin key was configured: generated one and saved it in %s (mode "
                    "600; it is reused on later starts). Create a tenant with:  "
                    "%sTESSERA_ADMIN_KEY=%s tessera create-tenant acme", path, target, key)
    else:
        log.info("admin key from %s", path)
    return settings.model_copy(update={"admin_key": SecretStr(key)})


def key_file(store_data_dir: Path, environ: Mapping[str, str]) -> Path:
    """Where the generated admin key lives (see the module docstring)."""
    configured = environ.get(ENV)
    if configured:
        return Path(configured).expanduser()
    return store_data_dir.parent / "admin.key"


def load_or_create(path: Path) -> tuple[str, bool]:
    """The key stored at ``path`` and False; or, if there is no file, a new random key
    written there and True. The file is created exclusively with mode 0600 (never
    overwriting a key, never readable by other users, whatever the umask)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _cannot_create(path, exc) from exc
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path), False
    except OSError as exc:
        raise _cannot_create(path, exc) from exc
    key = new_api_key("tsa")
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
        out.flush()
        os.fsync(out.fileno())
    return key, True


def _cannot_create(path: Path, exc: OSError) -> AdminKeyError:
    return AdminKeyError(f"cannot create the admin key file {path}: {exc.strerror}; set "
                         f"TESSERA_ADMIN_KEY, or {ENV} to a writable path")


def _read(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminKeyError(f"cannot read the admin key file {path}: {exc}") from exc
    if not key or any(c.isspace() for c in key):
        raise AdminKeyError(f"the admin key file {path} holds no key (one line of "
                            "non-blank text); delete it to generate a new one")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the admin key file %s is readable by other users (mode %o); "
                    "chmod 600 it", path, stat.S_IMODE(mode))
    return key
