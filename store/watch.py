"""Change notification across replicas: pub/sub plus a periodic version check.

Every store mutation does ``INCR changes`` and ``PUBLISH events <json>`` in one transaction.
:class:`ChangeWatcher` runs two asyncio tasks:

* a subscriber on ``Keys.events()`` that hands each event to the listeners at once;
* a checker that, every ``settings.poll_interval_s`` (and right after the subscriber
  re-subscribes), reads the counter and decides whether pub/sub missed anything. If it
  did, listeners get one ``resync`` event and should re-read whatever they cache.

How "missed" is decided exactly, without races: the checker reads the counter and
publishes a private *marker* on the same channel in one MULTI/EXEC. Redis delivers a
channel's messages in order, so the events the subscriber counted between two of its own
markers are exactly the mutations between the two counter reads. Counter delta ==
events counted: nothing missed. Delta differs, a marker did not come back in time, or the
subscription was re-established in between: resync. Without pub/sub (``subscribe=False``,
e.g. an ACL that forbids channels) every counter move is a resync.

The watcher never raises into its caller: Redis errors are logged once per outage and
retried with capped exponential backoff; listener errors are logged and swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from tessera.store.keys import Keys
from tessera.store.settings import StoreSettings

log = logging.getLogger(__name__)

RESYNC = "resync"
MARKER = "watch.marker"
_REDIS_ERRORS = (rex.RedisError, OSError)
_MARKER_WAIT_CAP_S = 1.0
_RECONNECT_CAP_S = 2.0


@dataclass(frozen=True)
class ChangeEvent:
    """A store change (``kind`` from :mod:`tessera.store.models`) or a ``resync`` request."""

    kind: str
    source: Literal["pubsub", "check"]
    tenant: str | None = None
    name: str | None = None
    version: int | None = None
    revision: int | None = None
    reason: str | None = None          # resync only: startup | missed | resubscribed | ...
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_resync(self) -> bool:
        return self.kind == RESYNC

    @classmethod
    def from_message(cls, doc: Mapping[str, Any]) -> ChangeEvent:
        def opt_int(value: Any) -> int | None:
            return value if isinstance(value, int) else None

        def opt_str(value: Any) -> str | None:
            return value if isinstance(value, str) else None

        return cls(kind=str(doc.get("kind", "unknown")), source="pubsub",
                   tenant=opt_str(doc.get("tenant")), name=opt_str(doc.get("name")),
                   version=opt_int(doc.get("version")), revision=opt_int(doc.get("revision")),
                   data=dict(doc))


Listener = Callable[[ChangeEvent], Awaitable[None] | None]


@dataclass(frozen=True)
class _Marker:
    token: int
    epoch: int      # subscription it arrived on
    counted: int    # events seen since the previous marker on the same subscription
    previous: int   # token of that previous marker (-1: first on this subscription)


class _Outage:
    """Log a loop's failures once per outage, and its recovery once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("change watcher: Redis unreachable, retrying",
                        extra={"loop": self.what, "error": repr(exc)})

    def ok(self) -> None:
        if self.since is not None:
            log.info("change watcher: Redis reachable again",
                     extra={"loop": self.what, "down_s": round(time.monotonic() - self.since, 3)})
            self.since = None


class ChangeWatcher:
    """Calls registered listeners with every :class:`ChangeEvent`; see the module doc."""

    def __init__(self, redis: Redis, keys: Keys, settings: StoreSettings, *,
                 subscribe: bool = True) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._subscribe = subscribe
        self._id = uuid.uuid4().hex
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._check_now = asyncio.Event()
        self._ready = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._marker_seen = asyncio.Condition()
        self._check_done = asyncio.Condition()
        self._checks_started = 0
        self._checks_finished = 0
        # subscriber state
        self._epoch = 0
        self._counted = 0
        self._last_marker_token = -1
        self._marker: _Marker | None = None
        # checker state
        self._token = 0
        self._last_counter: int | None = None
        self._last_token = -1
        # counters for metrics and tests
        self.events = 0
        self.resyncs = 0
        self.checks = 0
        self.subscriptions = 0
        self.reachable = True  # the last version check reached Redis (health reporting)

    # --- public API ---------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def start(self, ready_timeout_s: float = 2.0) -> bool:
        """Start both loops; wait (bounded) until subscribed and the first check ran.
        Returns whether that happened in time; the loops keep trying either way."""
        if not self.running:
            self._tasks = [asyncio.create_task(self._check_loop(), name="watch-check")]
            if self._subscribe:
                self._tasks.append(asyncio.create_task(self._subscribe_loop(),
                                                       name="watch-subscribe"))
        try:
            async with asyncio.timeout(ready_timeout_s):
                await self._ready.wait()
                if self._subscribe:
                    await self._subscribed.wait()
            return True
        except TimeoutError:
            log.warning("change watcher: not ready yet, continuing in the background",
                        extra={"channel": self._keys.events()})
            return False

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        async with self._check_done:
            self._check_done.notify_all()

    def request_check(self) -> None:
        """Run the version check now instead of at the next interval."""
        self._check_now.set()

    async def check_now(self) -> None:
        """Run a version check now and wait until it finished (succeeded or failed)."""
        if not self.running:
            return
        target = self._checks_started + 1
        self._check_now.set()
        async with self._check_done:
            await self._check_done.wait_for(
                lambda: self._checks_finished >= target or not self.running)

    # --- dispatch -----------------------------------------------------------------------
    async def _dispatch(self, event: ChangeEvent) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("change watcher: listener failed",
                              extra={"kind": event.kind, "listener": repr(listener)})

    async def _resync(self, reason: str) -> None:
        self.resyncs += 1
        log.info("change watcher: resync", extra={"reason": reason})
        await self._dispatch(ChangeEvent(kind=RESYNC, source="check", reason=reason))

    # --- subscriber ---------------------------------------------------------------------
    async def _subscribe_loop(self) -> None:
        outage = _Outage("subscribe")
        failures = 0
        channel = self._keys.events()
        while True:
            pubsub: PubSub = self._redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "subscribe":
                        outage.ok()
                        failures = 0
                        await self._on_subscribed()
                    elif kind == "message":
                        await self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                outage.failed(exc)
            except Exception:
                log.exception("change watcher: subscriber failed")
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            delay = min(_RECONNECT_CAP_S, self._settings.backoff_base_s * 2 ** failures)
            failures = min(failures + 1, 16)
            await asyncio.sleep(delay)

    async def _on_subscribed(self) -> None:
        # A new (or re-established) subscription: anything published while it was down is
        # lost, so start a new counting epoch and ask the checker to compare now.
        self._epoch += 1
        self._counted = 0
        self._last_marker_token = -1
        self.subscriptions += 1
        self._subscribed.set()
        if self.subscriptions > 1:
            self._check_now.set()

    async def _on_message(self, data: Any) -> None:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("event is not a JSON object")
        except (ValueError, TypeError):
            log.warning("change watcher: unreadable event ignored",
                        extra={"payload": repr(data)[:200]})
            return
        if doc.get("kind") == MARKER:
            if doc.get("watcher") == self._id and isinstance(doc.get("token"), int):
                token = int(doc["token"])
                self._marker = _Marker(token=token, epoch=self._epoch, counted=self._counted,
                                       previous=self._last_marker_token)
                self._counted = 0
                self._last_marker_token = token
                async with self._marker_seen:
                    self._marker_seen.notify_all()
            return                                  # other replicas' markers: not changes
        self._counted += 1
        self.events += 1
        await self._dispatch(ChangeEvent.from_message(doc))

    # --- periodic check -----------------------------------------------------------------
    def _marker_wait_s(self) -> float:
        return min(_MARKER_WAIT_CAP_S, self._settings.poll_interval_s / 5)

    async def _check_loop(self) -> None:
        outage = _Outage("check")
        if self._subscribe:
            # the first check sets the baseline: take it on a live subscription if one comes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(2.0, self._settings.poll_interval_s)):
                    await self._subscribed.wait()
        # A check may wait up to one marker wait before it decides; starting checks that
        # much (twice, for scheduling slack) earlier than the interval keeps "a change is
        # noticed within poll_interval_s" true even when pub/sub is silently dead.
        period = self._settings.poll_interval_s - 2 * self._marker_wait_s()
        while True:
            self._check_now.clear()
            self._checks_started += 1
            started = time.monotonic()
            try:
                await self._check()
                outage.ok()
                self.reachable = True
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                outage.failed(exc)
                self.reachable = False
            except Exception:
                log.exception("change watcher: version check failed")
            self._checks_finished += 1
            async with self._check_done:
                self._check_done.notify_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, period - (time.monotonic() - started))):
                    await self._check_now.wait()

    async def _read_counter(self, token: int, with_marker: bool) -> int:
        """GET the counter, and publish our marker in the same transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self._keys.changes())
            if with_marker:
                pipe.publish(self._keys.events(), json.dumps(
                    {"kind": MARKER, "watcher": self._id, "token": token}))
            results = await pipe.execute()
        return int(results[0] or 0)

    async def _check(self) -> None:
        self._token += 1
        token = self._token
        with_marker = self._subscribe and self._subscribed.is_set()
        try:
            counter = await self._read_counter(token, with_marker)
        except rex.ResponseError:
            if not with_marker:
                raise
            with_marker = False                     # e.g. an ACL now forbids the channel
            counter = await self._read_counter(token, with_marker)
        self.checks += 1
        marker = await self._wait_marker(token) if with_marker else None

        previous_counter, previous_token = self._last_counter, self._last_token
        self._last_counter = counter
        self._last_token = token if marker is not None else -1
        self._ready.set()
        if previous_counter is None:
            await self._resync("startup")           # anything cached before now is suspect
            return
        if marker is not None and marker.previous == previous_token != -1:
            if counter - previous_counter == marker.counted:
                return                              # pub/sub delivered every change
            reason = "missed"
        elif counter == previous_counter:
            return                                  # no mutation since the last check
        elif marker is not None:
            reason = "resubscribed"                 # a new subscription may have lost some
        else:
            reason = "marker lost" if with_marker else "counter moved"
        await self._resync(reason)

    async def _wait_marker(self, token: int) -> _Marker | None:
        wait_s = self._marker_wait_s()
        try:
            async with asyncio.timeout(wait_s), self._marker_seen:
                await self._marker_seen.wait_for(
                    lambda: self._marker is not None and self._marker.token >= token)
        except TimeoutError:
            return None
        marker = self._marker
        return marker if marker is not None and marker.token == token else None
