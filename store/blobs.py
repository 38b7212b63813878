"""Content-addressed, chunked, reference-counted blobs.

A blob's id is the sha256 of its bytes; it is stored once however many versions use it, as
``Keys.blob(sha)`` (HASH sha256, size, chunk_bytes, chunks, refs) plus ``chunks`` string
keys of at most ``chunk_bytes`` each (well under Redis's 512 MB value limit). The chunk
size is recorded per blob, so changing the setting never breaks existing blobs.

Writing, and the upload-vs-delete race
--------------------------------------
An upload first *stages* its chunks under keys private to that upload
(``Keys.upload_chunk(upload_id, i)``, with a TTL so a crashed uploader leaves nothing
behind for long), then one Lua script (:mod:`tessera.store.lua`) references the blob together with
the record that uses it. Inside that script, atomically:

* the blob exists -> ``refs += 1``, the staged copy is deleted;
* it does not, and every staged chunk is present -> the staged keys are RENAMEd to the
  blob's chunk keys (O(1), no copy), PERSISTed, and the meta is written with ``refs = 1``;
* it does not and nothing (or not everything) was staged -> ``NEED_DATA``; the caller
  stages and tries again.

Deleting the last reference runs in one script too (``refs -= 1``; at 0 the meta and every
chunk go). Because reference and release are each one atomic script that re-checks the
blob's state, an upload that skipped staging because the blob existed, racing a delete that
freed it, gets ``NEED_DATA`` rather than a dangling reference; and a delete never removes
chunks an upload has just referenced. No WATCH, no client-side locks.

Reading checks size and sha256 of the reassembled bytes (:class:`IntegrityError`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis import exceptions as rex
from redis.asyncio import Redis

from tessera.store.errors import IntegrityError, NotFoundError
from tessera.store.keys import Keys

log = logging.getLogger(__name__)

STAGING_TTL_S = 3600
"""Staged chunks of an upload that never committed expire after this long."""
_THREAD_HASH_BYTES = 1 << 20  # hash bigger payloads off the event loop (hashlib frees the GIL)
_PIPELINE_BYTES = 64 << 20  # bytes per pipeline round trip when staging or reading


async def digest(data: bytes) -> str:
    """sha256 hex of ``data``; large payloads are hashed in a worker thread."""
    if len(data) >= _THREAD_HASH_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BlobRef:
    """The acquire section of a write script (see :mod:`tessera.store.lua`)."""

    sha256: str
    size: int
    chunk_bytes: int
    staged: tuple[str, ...] = ()
    final: tuple[str, ...] = ()
    is_staged: bool = False

    def keys(self, keys: Keys) -> list[str]:
        return [keys.blob(self.sha256), *self.staged, *self.final]

    def args(self) -> list[str | int]:
        return [self.sha256, self.size, self.chunk_bytes, int(self.is_staged),
                len(self.staged)]


@dataclass(frozen=True)
class Release:
    """Release sections of a delete script: ``chunks`` is -1 for an already-missing blob."""

    sections: tuple[tuple[str, int], ...]  # (sha256, chunks)

    def keys(self, keys: Keys) -> list[str]:
        out: list[str] = []
        for sha, chunks in self.sections:
            out.append(keys.blob(sha))
            out.extend(keys.blob_chunk(sha, i) for i in range(max(chunks, 0)))
        return out

    def args(self) -> list[int]:
        return [len(self.sections), *(chunks for _, chunks in self.sections)]


class Blobs:
    """Staging, reading and release bookkeeping for blobs on one Redis key space."""

    def __init__(self, redis: Redis, keys: Keys, chunk_bytes: int) -> None:
        self._redis = redis
        self._keys = keys
        self._chunk_bytes = chunk_bytes

    def unstaged(self, sha256: str, size: int) -> BlobRef:
        """Reference a blob believed to exist already (the script answers NEED_DATA if not)."""
        return BlobRef(sha256, size, self._chunk_bytes)

    async def exists(self, sha256: str) -> bool:
        return bool(await self._redis.exists(self._keys.blob(sha256)))

    async def stage(self, data: bytes, sha256: str) -> BlobRef:
        """Write ``data``'s chunks under fresh staging keys (with a TTL)."""
        upload_id = uuid.uuid4().hex
        size = len(data)
        n = -(-size // self._chunk_bytes)
        view = memoryview(data)
        staged = tuple(self._keys.upload_chunk(upload_id, i) for i in range(n))
        final = tuple(self._keys.blob_chunk(sha256, i) for i in range(n))
        per_trip = max(1, _PIPELINE_BYTES // self._chunk_bytes)
        try:
            for first in range(0, n, per_trip):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for i in range(first, min(n, first + per_trip)):
                        chunk = view[i * self._chunk_bytes:(i + 1) * self._chunk_bytes]
                        pipe.set(staged[i], bytes(chunk), ex=STAGING_TTL_S)
                    await pipe.execute()
        except (rex.ConnectionError, rex.TimeoutError, OSError):
            raise  # unreachable: cleanup would only wait again; the TTL removes them
        except BaseException:
            await self.discard_quietly(staged)
            raise
        log.debug("blob staged", extra={"sha256": sha256, "size": size, "chunks": n})
        return BlobRef(sha256, size, self._chunk_bytes, staged, final, is_staged=True)

    async def discard_quietly(self, staged: Sequence[str]) -> None:
        """Best effort: drop staged chunks that were not committed (they expire anyway)."""
        if not staged:
            return
        try:
            await self._redis.delete(*staged)
        except Exception:  # the TTL cleans up; the caller's own error matters more
            log.warning("could not drop staged chunks", extra={"count": len(staged)})

    async def chunk_counts(self, shas: Sequence[str]) -> Release:
        """Current chunk count of each blob, for a release section (-1: blob missing)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for sha in shas:
                pipe.hget(self._keys.blob(sha), "chunks")
            raw = await pipe.execute()
        return Release(tuple((sha, int(c) if c is not None else -1)
                             for sha, c in zip(shas, raw, strict=True)))

    async def read(self, sha256: str) -> bytes:
        """The blob's bytes, verified. NotFoundError when it is gone (deleted meanwhile)."""
        meta = await self._redis.hgetall(self._keys.blob(sha256))
        if not meta:
            raise NotFoundError(f"blob {sha256} is not stored")
        n, size = int(meta[b"chunks"]), int(meta[b"size"])
        chunk_bytes = int(meta[b"chunk_bytes"])
        per_trip = max(1, _PIPELINE_BYTES // chunk_bytes)
        parts: list[bytes] = []
        for first in range(0, n, per_trip):
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in range(first, min(n, first + per_trip)):
                    pipe.get(self._keys.blob_chunk(sha256, i))
                got = await pipe.execute()
            if any(part is None for part in got):
                # freed between the meta read and the chunk reads, or damaged
                if not await self.exists(sha256):
                    raise NotFoundError(f"blob {sha256} was deleted while reading")
                raise IntegrityError(f"blob {sha256} is missing chunks")
            parts.extend(got)
        data = b"".join(parts)
        if len(data) != size or await digest(data) != sha256:
            raise IntegrityError(f"blob {sha256}: stored bytes do not match their sha256 "
                                 f"({len(data)} bytes, expected {size})")
        return data
