"""Safe reading and writing of weight files: safetensors only, never pickle.

Every artifact reader (PEFT folders, tessera's own format, hypernetworks) goes through
:func:`read_safetensors`, which refuses pickle-based payloads up front (``UnsafeFormatError``)
and turns any malformed safetensors (bad header, offsets, dtype/size mismatch) into an
``AdapterValidationError`` instead of a crash.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tessera.adapters.errors import AdapterValidationError, UnsafeFormatError

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own header cap
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


def refuse_unsafe_name(filename: str) -> None:
    if filename.lower().endswith(UNSAFE_SUFFIXES):
        raise UnsafeFormatError(f"{filename}: pickle-based weight files are refused; "
                                "upload safetensors")


def looks_safetensors(data: bytes) -> bool:
    """A header length that fits the payload, then the header's opening brace."""
    if len(data) < 9:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    return 2 <= size <= min(MAX_HEADER_BYTES, len(data) - 8) and data[8:9] == b"{"


def looks_pickled(data: bytes) -> bool:
    """Pickle protocol 2+ starts with 0x80; ``torch.save`` archives are zip files.

    Safetensors is recognised first: its first byte is the low byte of the header length,
    0x80 for one header in 256 lengths, and such a file is not a pickle. A pickle cannot
    pass as safetensors: its bytes 1-7 (protocol, opcodes) read as a length far beyond
    any payload."""
    if looks_safetensors(data):
        return False
    return data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"


def read_safetensors(data: bytes, *, what: str = "weights"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors payload, checked before decoding."""
    if looks_pickled(data):
        raise UnsafeFormatError(f"{what}: payload is a pickle/torch.save archive, not "
                                "safetensors; it was not loaded")
    header = _parse_header(data, what)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterValidationError(f"malformed safetensors: {exc}", tensor=what) from None
    raw_meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in raw_meta.items()}


def _parse_header(data: bytes, what: str) -> dict[str, dict[str, object]]:
    if len(data) < 8:
        raise AdapterValidationError("malformed safetensors: shorter than its 8-byte header "
                                     "length", tensor=what)
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise AdapterValidationError(f"malformed safetensors: header length {size} does not "
                                     f"fit a {len(data)}-byte payload", tensor=what)
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"malformed safetensors header: {exc}",
                                     tensor=what) from None
    if not isinstance(header, dict):
        raise AdapterValidationError("malformed safetensors header: not a JSON object",
                                     tensor=what)
    body = len(data) - 8 - size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(name, entry, body)
    return header


def _check_entry(name: str, entry: object, body: int) -> None:
    if not isinstance(entry, dict):
        raise AdapterValidationError("malformed safetensors entry", tensor=name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise AdapterValidationError(f"unsupported safetensors dtype {dtype!r}", tensor=name)
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise AdapterValidationError("malformed safetensors entry (shape/offsets)", tensor=name)
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    if not 0 <= begin <= end <= body:
        raise AdapterValidationError(f"data offsets [{begin}, {end}] outside the {body}-byte "
                                     "data section", tensor=name)
    if end - begin != numel * _ITEMSIZE[dtype]:
        raise AdapterValidationError(
            f"{end - begin} bytes for a {dtype} tensor of shape {shape} "
            f"({numel * _ITEMSIZE[dtype]} bytes expected)", tensor=name)


def write_safetensors(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """Canonical bytes: contiguous CPU tensors, keys sorted by the library."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata=dict(metadata) if metadata else None)
