"""The one name rule for tenants, tasks, adapters, hypernetworks and task embeddings.

``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`` with no ``..``: no path separators, no NUL or other
control characters, no leading dot or dash, at most 64 characters. Names become parts of
Redis keys (``:`` is excluded, so a name never spans key segments) and may become parts of
file paths.
"""

from __future__ import annotations

import re

from tessera.store.errors import InvalidNameError

MAX_NAME_LENGTH = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid name, else raise :class:`InvalidNameError`."""
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"{what} is {len(value)} characters long; the limit is "
                               f"{MAX_NAME_LENGTH}")
    if NAME_RE.fullmatch(value) is None or ".." in value:
        raise InvalidNameError(
            f"{what} {value[:80]!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'")
    return value
