"""Reading an adapter upload safely: the request body is counted while it streams (413
before it is buffered whole), archives are read in memory member by member in a worker
thread (no paths trusted; member count, declared sizes and decompressed bytes capped
before the work; only ``adapter_config.json`` and ``adapter_model.safetensors`` read),
pickle files refused (415)."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import json
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from tessera.adapters import artifact
from tessera.adapters.errors import AdapterValidationError, UnsafeFormatError
from tessera.adapters.method import Adapter
from tessera.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft
from tessera.adapters.safeio import UNSAFE_SUFFIXES, refuse_unsafe_name
from tessera.server.http_errors import ApiError

UploadFormat = Literal["peft", "tessera"]


@dataclass(frozen=True)
class Upload:
    """A parsed upload: what is stored (config for PEFT, manifest for tessera) + weights."""

    format: UploadFormat
    document: dict[str, Any]
    weights: bytes

    def decode(self) -> Adapter:
        return decode(self.format, self.document, self.weights)


@dataclass(frozen=True)
class DecodedAdapter:
    """What the host cache holds: a decoded adapter and its size in host memory."""

    adapter: Adapter
    nbytes: int


def decoded(adapter: Adapter) -> DecodedAdapter:
    size = sum(t.numel() * t.element_size() for c in adapter.components
               for tensors in c.modules.values() for t in tensors.values())
    return DecodedAdapter(adapter, size)


def decode(format: str, document: dict[str, Any], weights: bytes) -> Adapter:
    if format == "peft":
        return load_peft(document, weights)
    return artifact.loads(json.dumps(document).encode(), weights)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"upload exceeds the limit of {limit} bytes", field="body")


async def _counted(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        yield chunk


async def read_form(request: Request, limit: int) -> FormData:
    """The multipart form of ``request``; 413 from the Content-Length header or as soon as
    the streamed body passes ``limit`` (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       "send the adapter as multipart/form-data", field="content-type")
    parser = MultiPartParser(request.headers, _counted(request, limit), max_files=4,
                             max_fields=8)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {exc.message}",
                       field="body") from None


def only_fields(form: FormData, allowed: tuple[str, ...]) -> None:
    """400 naming the first form field that is not one of ``allowed``."""
    unknown = sorted(set(form.keys()) - set(allowed))
    if unknown:
        raise ApiError(400, "invalid_request", f"unexpected form field {unknown[0]!r} "
                       f"(send {', '.join(repr(a) for a in allowed)})", field=unknown[0])


async def required_part(form: FormData, name: str, *, weights: bool = False) -> bytes:
    """The bytes of form field ``name`` (422 when missing; 415 for a pickle-named file
    where ``weights``)."""
    part = await _read_part(form, name)
    if part is None:
        raise ApiError(422, "invalid_request", f"missing form field {name!r}", field=name)
    if weights:
        refuse_unsafe_name(part[1])
    return part[0]


async def _read_part(form: FormData, name: str) -> tuple[bytes, str] | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        return await value.read(), value.filename or name
    return value.encode(), name


async def parse_upload(form: FormData, max_archive_bytes: int) -> Upload:
    """An :class:`Upload` from the form: ``archive`` (PEFT folder as .tar.gz/.tgz/.tar/.zip)
    or ``config`` (JSON) + ``weights`` (safetensors). The archive and JSON are read in a
    worker thread: a large upload never stalls the event loop."""
    unknown = sorted(set(form.keys()) - {"archive", "config", "weights"})
    if unknown:
        raise ApiError(400, "invalid_request", f"unexpected form field {unknown[0]!r} "
                       "(send 'archive', or 'config' and 'weights')", field=unknown[0])
    archive = await _read_part(form, "archive")
    if archive is not None:
        if "config" in form or "weights" in form:
            raise ApiError(400, "invalid_request", "send either 'archive' or 'config' + "
                           "'weights', not both", field="archive")
        return await asyncio.to_thread(_from_archive, archive[0], archive[1],
                                       max_archive_bytes)
    config = await _read_part(form, "config")
    weight_part = await _read_part(form, "weights")
    if weight_part is not None:
        refuse_unsafe_name(weight_part[1])
    if config is None or weight_part is None:
        missing = "config" if config is None else "weights"
        raise ApiError(422, "invalid_request", f"missing form field {missing!r}",
                       field=missing)
    return await asyncio.to_thread(from_files, config[0], weight_part[0])


def _from_archive(data: bytes, filename: str, max_archive_bytes: int) -> Upload:
    return from_files(*extract_peft(data, filename, max_archive_bytes))


def from_files(config_bytes: bytes, weights: bytes) -> Upload:
    """An upload from a config (PEFT or tessera manifest) and weights; blocking."""
    document = _json_object(config_bytes)
    if document.get("format") == artifact.ADAPTER_FORMAT:
        return Upload("tessera", document, weights)
    if "peft_type" in document:
        return Upload("peft", document, weights)
    raise AdapterValidationError(
        f"neither a PEFT adapter_config.json (no 'peft_type') nor a tessera manifest "
        f"('format': {artifact.ADAPTER_FORMAT!r})", tensor="config")


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"not valid JSON: {exc}", tensor="config") from None
    if not isinstance(doc, dict):
        raise AdapterValidationError("must be a JSON object", tensor="config")
    return doc


# --- archives ---------------------------------------------------------------------------
# Everything an archive declares counts before it is read: every member's size (passed
# over or not: a tar stream is decompressed through the members it skips) against the
# ``max_archive_bytes`` budget, the number of members, and for tar the decompressed stream
# itself (headers, pax records, padding), so no member or header makes the reader work
# past the budget.
_WANTED = (CONFIG_NAME, WEIGHTS_NAME)
# A PEFT folder holds a handful of files (config, weights, README.md, training args...);
# an archive of more is not one, refused before its members are read.
MAX_ARCHIVE_MEMBERS = 64
# Decompressed tar stream allowed past the members' declared sizes: their 512-byte headers
# (more with long names and pax records), the padding and the end-of-archive blocks.
_TAR_OVERHEAD = 1 << 20
# Zip central directory bytes allowed per member (a 46-byte entry + name, extra fields,
# comment): bounds the parse of the directory whatever its record says the count is.
_ZIP_ENTRY_BYTES = 1024
# Compression methods whose reads are bounded by the bytes asked for (zipfile's bzip2 and
# lzma readers decompress a whole compressed chunk at once, whatever it expands to).
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_EOCD = struct.Struct("<4s4H2LH")  # zip end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_archive", message, field="archive")


def _too_many_members(count: int | None = None) -> ApiError:
    held = f"more than {MAX_ARCHIVE_MEMBERS}" if count is None else str(count)
    return _invalid(f"archive holds {held} members; at most {MAX_ARCHIVE_MEMBERS} are "
                    f"allowed (a PEFT folder has a handful of files: {CONFIG_NAME}, "
                    f"{WEIGHTS_NAME}, a README...)")


def _member_name(raw: str) -> str | None:
    """The file name of a wanted member (``name`` or ``<folder>/name``); None for others.
    Absolute paths, ``..`` and backslashes are refused whatever the name."""
    if "\\" in raw or "\x00" in raw:
        raise _invalid(f"archive member {raw[:80]!r} has an unsafe path")
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts:
        raise _invalid(f"archive member {raw[:80]!r} escapes the archive (absolute path "
                       "or '..')")
    parts = [p for p in path.parts if p != "."]
    if not parts or len(parts) > 2 or parts[-1] not in _WANTED:
        return None
    return parts[-1]


class _Collector:
    """Members in archive order: counted, their declared sizes budgeted (all of them, at
    their header, before their data is read or passed over), the wanted ones read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.members = 0
        self.found: dict[str, bytes] = {}
        self.unsafe: list[str] = []

    def add(self, raw_name: str, is_file: bool, declared: int,
            read: Callable[[int], bytes]) -> None:
        self.members += 1
        if self.members > MAX_ARCHIVE_MEMBERS:
            raise _too_many_members()
        if raw_name.lower().endswith(UNSAFE_SUFFIXES):
            self.unsafe.append(raw_name)
        name = _member_name(raw_name)
        self.total += max(declared, 0)
        if self.total > self.limit:
            raise ApiError(413, "payload_too_large", "archive members declare more than "
                           f"the limit of {self.limit} uncompressed bytes (at member "
                           f"{raw_name[:80]!r}, {declared} bytes)", field="archive")
        if name is None:
            return
        if not is_file:
            raise _invalid(f"archive member {raw_name!r} is not a regular file")
        if name in self.found:
            raise _invalid(f"archive holds more than one {name}")
        data = read(declared + 1)  # one byte more: a member longer than declared shows
        if len(data) != declared:
            raise _invalid(f"archive member {raw_name!r} is not the size its header "
                           "declares")
        self.found[name] = data

    def result(self) -> tuple[bytes, bytes]:
        if WEIGHTS_NAME not in self.found and self.unsafe:
            raise UnsafeFormatError(f"{self.unsafe[0]}: pickle-based weight files are "
                                    "refused and were not loaded; upload "
                                    f"{WEIGHTS_NAME}")
        for name in _WANTED:
            if name not in self.found:
                raise AdapterValidationError(f"the archive has no {name}", tensor=name)
        return self.found[CONFIG_NAME], self.found[WEIGHTS_NAME]


def extract_peft(data: bytes, filename: str, limit: int) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` from an archive in memory, with
    at most ``limit`` bytes declared by its members (413) and at most
    :data:`MAX_ARCHIVE_MEMBERS` members (400). Blocking: call it in a worker thread."""
    refuse_unsafe_name(filename)
    collector = _Collector(limit)
    if data[:4] == b"PK\x03\x04":
        _read_zip(data, collector)
    else:
        _read_tar(data, collector, limit)
    return collector.result()


def _read_zip(data: bytes, collector: _Collector) -> None:
    _check_zip_directory(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise _too_many_members(len(infos))
            for info in infos:
                def read(n: int, info: zipfile.ZipInfo = info,
                         zf: zipfile.ZipFile = zf) -> bytes:
                    if info.flag_bits & 0x1:
                        raise _invalid(f"archive member {info.filename!r} is encrypted")
                    if info.compress_type not in _ZIP_METHODS:
                        raise _invalid(f"archive member {info.filename!r} uses zip "
                                       f"compression method {info.compress_type}; store "
                                       "it or deflate it")
                    with zf.open(info) as f:
                        return f.read(n)  # deflate output is bounded by n too
                collector.add(info.filename, not info.is_dir(), info.file_size, read)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
            ValueError) as exc:
        raise _invalid(f"unreadable zip archive: {exc}") from None


def _check_zip_directory(data: bytes) -> None:
    """400 for too many members from the end of central directory record, before
    :mod:`zipfile` parses the directory (which it walks by its byte size, whatever count
    the record states: both are bounded)."""
    found = _zip_directory(data)
    if found is None:
        return  # zipfile says why it is no zip
    entries, size = found
    if entries > MAX_ARCHIVE_MEMBERS:
        raise _too_many_members(entries)
    if size > MAX_ARCHIVE_MEMBERS * _ZIP_ENTRY_BYTES:
        raise _invalid(f"the zip central directory is {size} bytes, more than "
                       f"{MAX_ARCHIVE_MEMBERS} members need: it lists too many members")


def _zip_directory(data: bytes) -> tuple[int, int] | None:
    """``(entries, directory bytes)`` of the end of central directory record (zip64's
    where there is one), found where :mod:`zipfile` looks for it; None if there is none."""
    end = len(data) - _EOCD.size
    if not (end >= 0 and data[end:end + 4] == b"PK\x05\x06" and data[-2:] == b"\0\0"):
        end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - _EOCD.size))
        if end < 0 or len(data) - end < _EOCD.size:
            return None
    entries, size = _EOCD.unpack_from(data, end)[4:6]
    locator = end - _ZIP64_LOCATOR.size
    record = locator - _ZIP64_EOCD.size
    if (record >= 0 and data[locator:locator + 4] == b"PK\x06\x07"
            and data[record:record + 4] == b"PK\x06\x06"):
        entries, size = _ZIP64_EOCD.unpack_from(data, record)[7:9]
    return int(entries), int(size)


def _read_tar(data: bytes, collector: _Collector, limit: int) -> None:
    try:
        with _decompressed(data) as raw:
            stream = _BoundedStream(raw, limit)
            with tarfile.open(fileobj=stream, mode="r:") as tf:
                for member in tf:  # counted and budgeted before next() passes its data
                    def read(n: int, member: tarfile.TarInfo = member,
                             tf: tarfile.TarFile = tf) -> bytes:
                        f = tf.extractfile(member)
                        return f.read(n) if f is not None else b""
                    collector.add(member.name, member.isreg(), member.size, read)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error,
            lzma.LZMAError) as exc:
        raise _invalid(f"not a readable .tar.gz/.tar/.zip archive: {exc}") from None


def _decompressed(data: bytes) -> io.BufferedIOBase:
    """The tar stream of ``data``: gunzipped, bunzipped or unxz'd lazily as it is read."""
    raw = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if data[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


class _BoundedStream:
    """A decompressed tar stream that refuses (413) to produce more than the budget plus
    :data:`_TAR_OVERHEAD` bytes in all, counted before each read or seek is done: seeking
    forward decompresses all it passes over (backward: from the start again), so neither a
    member's data nor a pax or long-name record can make it decompress past the budget."""

    def __init__(self, inner: io.BufferedIOBase, budget: int) -> None:
        self.inner = inner
        self.budget = budget
        self.limit = budget + _TAR_OVERHEAD
        self.work = 0
        self.pos = 0

    def _spend(self, n: int) -> None:
        self.work += n
        if self.work > self.limit:
            raise ApiError(413, "payload_too_large", "archive decompresses past the limit "
                           f"of {self.budget} bytes", field="archive")

    def read(self, size: int, /) -> bytes:
        if size < 0:
            raise ValueError("the archive stream is read in sized chunks")
        self._spend(size)
        data = self.inner.read(size)
        self.work -= size - len(data)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        if whence == io.SEEK_CUR:
            pos += self.pos
        elif whence != io.SEEK_SET:
            raise ValueError("the archive stream seeks from its start only")
        self._spend(pos - self.pos if pos >= self.pos else pos)
        self.pos = self.inner.seek(pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("the archive stream is read-only")

    def close(self) -> None:
        pass  # the caller closes the inner stream
