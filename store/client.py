"""Redis connections with bounded timeouts and redis-py's own retry with backoff, and the
one place Redis exceptions become typed store errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from tessera.store.errors import StoreFullError, StoreUnavailableError
from tessera.store.settings import StoreSettings


def connect(url: str, settings: StoreSettings) -> Redis:
    """An asyncio client for ``url`` (redis://, rediss://, unix://; ACL credentials in the
    URL). Connection errors and timeouts are retried ``settings.retries`` times with
    exponential backoff, so a dead server fails a call within about
    ``connect_timeout + retries * (socket_timeout + backoff_cap)``."""
    retry = Retry(ExponentialBackoff(cap=settings.backoff_cap_s, base=settings.backoff_base_s),
                  settings.retries)
    return Redis.from_url(
        url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=retry,
        retry_on_error=[rex.ConnectionError, rex.TimeoutError],
        health_check_interval=30,
        decode_responses=False,
    )


@contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Map redis-py exceptions raised inside the block to store errors naming ``action``."""
    try:
        yield
    except rex.ResponseError as exc:
        if isinstance(exc, rex.OutOfMemoryError) or str(exc).startswith("OOM"):
            raise StoreFullError(f"{action}: Redis is out of memory and refuses writes "
                                 "(maxmemory with noeviction); nothing was stored") from exc
        raise StoreUnavailableError(f"{action}: Redis answered with an error: {exc}") from exc
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise StoreUnavailableError(f"{action}: Redis is unreachable ({exc})") from exc
