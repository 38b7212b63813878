"""Typed store errors. The server maps each class to one HTTP status in one place."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidNameError(StoreError):
    """A tenant, task, adapter or hypernetwork name breaks the name rule (HTTP 400)."""


class NotFoundError(StoreError):
    """Unknown, or owned by another tenant: the two are indistinguishable (HTTP 404)."""


class ConflictError(StoreError):
    """A compare-and-set lost, or the object already exists / is still referenced (HTTP 409)."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached (or answered with an error) within the configured timeouts
    (HTTP 503). Raised fast: writes never wait longer than the retry budget."""


class StoreFullError(StoreUnavailableError):
    """Redis refused a write because it is out of memory (``noeviction``): nothing was
    evicted and nothing was stored (HTTP 507 or 503)."""


class IntegrityError(StoreError):
    """A blob read back does not match its sha256 (HTTP 500: data corruption, never input)."""
