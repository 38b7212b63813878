"""Reading an adapter upload safely: the request body is counted while it streams (413
before it is buffered whole), archives are read in memory member by member (no paths
trusted, sizes capped, only ``adapter_config.json`` and ``adapter_model.safetensors``
read), pickle files refused (415)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from adapters import artifact
from adapters.errors import AdapterValidationError, UnsafeFormatError
from adapters.method import Adapter
from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft
from adapters.safeio import UNSAFE_SUFFIXES, refuse_unsafe_name
from server.http_errors import ApiError

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
    or ``config`` (JSON) + ``weights`` (safetensors)."""
    unknown = sorted(set(form.keys()) - {"archive", "config", "weights"})
    if unknown:
        raise ApiError(400, "invalid_request", f"unexpected form field {unknown[0]!r} "
                       "(send 'archive', or 'config' and 'weights')", field=unknown[0])
    archive = await _read_part(form, "archive")
    if archive is not None:
        if "config" in form or "weights" in form:
            raise ApiError(400, "invalid_request", "send either 'archive' or 'config' + "
                           "'weights', not both", field="archive")
        config_bytes, weights = extract_peft(archive[0], archive[1], max_archive_bytes)
    else:
        config = await _read_part(form, "config")
        weight_part = await _read_part(form, "weights")
        if weight_part is not None:
            refuse_unsafe_name(weight_part[1])
        if config is None or weight_part is None:
            missing = "config" if config is None else "weights"
            raise ApiError(422, "invalid_request", f"missing form field {missing!r}",
                           field=missing)
        config_bytes, weights = config[0], weight_part[0]
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
_WANTED = (CONFIG_NAME, WEIGHTS_NAME)


def _member_name(raw: str) -> str | None:
    """The file name of a wanted member (``name`` or ``<folder>/name``); None for others.
    Absolute paths, ``..`` and backslashes are refused whatever the name."""
    if "\\" in raw or "\x00" in raw:
        raise ApiError(400, "invalid_archive", f"archive member {raw[:80]!r} has an unsafe "
                       "path", field="archive")
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts:
        raise ApiError(400, "invalid_archive", f"archive member {raw[:80]!r} escapes the "
                       "archive (absolute path or '..')", field="archive")
    parts = [p for p in path.parts if p != "."]
    if not parts or len(parts) > 2 or parts[-1] not in _WANTED:
        return None
    return parts[-1]


class _Collector:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.found: dict[str, bytes] = {}
        self.unsafe: list[str] = []

    def budget(self, declared: int) -> int:
        self.total += declared
        if self.total > self.limit:
            raise too_large(self.limit)
        return declared

    def add(self, raw_name: str, is_file: bool, declared: int,
            read: Any) -> None:
        if raw_name.lower().endswith(UNSAFE_SUFFIXES):
            self.unsafe.append(raw_name)
        name = _member_name(raw_name)
        if name is None:
            return
        if not is_file:
            raise ApiError(400, "invalid_archive", f"archive member {raw_name!r} is not a "
                           "regular file", field="archive")
        if name in self.found:
            raise ApiError(400, "invalid_archive", f"archive holds more than one {name}",
                           field="archive")
        self.budget(declared)
        data: bytes = read(declared + 1)
        if len(data) != declared:
            raise ApiError(400, "invalid_archive", f"archive member {raw_name!r} is not "
                           "the size its header declares", field="archive")
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
    """``(adapter_config.json, adapter_model.safetensors)`` from an archive in memory."""
    refuse_unsafe_name(filename)
    collector = _Collector(limit)
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    def read(n: int, info: zipfile.ZipInfo = info,
                             zf: zipfile.ZipFile = zf) -> bytes:
                        with zf.open(info) as f:
                            return f.read(n)
                    collector.add(info.filename, not info.is_dir(), info.file_size, read)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise ApiError(400, "invalid_archive", f"unreadable zip archive: {exc}",
                           field="archive") from None
        return collector.result()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for member in tf:
                def read_tar(n: int, member: tarfile.TarInfo = member,
                             tf: tarfile.TarFile = tf) -> bytes:
                    f = tf.extractfile(member)
                    return f.read(n) if f is not None else b""
                collector.add(member.name, member.isreg(), member.size, read_tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ApiError(400, "invalid_archive", "not a readable .tar.gz/.tar/.zip archive: "
                       f"{exc}", field="archive") from None
    return collector.result()
