"""Archive bombs refused by ``extract_peft`` before the work (DESIGN section 6): sizes
declared by every member count against the budget at their header (a 20 GiB member is
never decompressed), the decompressed tar stream is bounded (pax and long-name records
too), the member count is capped (zip: from its central directory, before parsing it),
zip reads never expand past the declared size."""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest

from tessera.server.http_errors import ApiError
from tessera.server.uploads import MAX_ARCHIVE_MEMBERS, extract_peft

GIB = 1 << 30
MIB = 1 << 20
LIMIT = 4 * MIB
CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"w" * 1000
ADAPTER = (("my-adapter/adapter_config.json", CONFIG),
           ("my-adapter/adapter_model.safetensors", WEIGHTS))


# --- builders (also used by tests/http/test_archive_bombs.py) ----------------------------
def tar_member(name: str, data: bytes = b"", *, size: int | None = None,
               type_: bytes = tarfile.REGTYPE) -> bytes:
    """One tar member as written by tarfile (pax format): its headers, ``data``, padding;
    ``size`` declares another size than ``len(data)`` (its data then follows the call)."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    info.type = type_
    header = info.tobuf(tarfile.PAX_FORMAT if type_ == tarfile.REGTYPE
                        else tarfile.GNU_FORMAT)
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def tar_of(files: Sequence[tuple[str, bytes]]) -> bytes:
    return b"".join(tar_member(name, data) for name, data in files) + b"\0" * 1024


_ZEROS_BLOCK: list[bytes] = []


def _zeros_mib() -> bytes:
    """Raw deflate of 1 MiB of zeros ending in a full flush: independent of what comes
    before, so n copies in a row are n MiB of zeros (a GiB costs ~1 MB, no compression)."""
    if not _ZEROS_BLOCK:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        _ZEROS_BLOCK.append(c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH))
    return _ZEROS_BLOCK[0]


def gzip_then_zeros(prefix: bytes, zeros_mib: int, *, complete: bool = False) -> bytes:
    """gzip of ``prefix`` followed by ``zeros_mib`` MiB of zeros, built without producing
    them; truncated (no end of stream) unless ``complete``."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip header
    out = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH) + _zeros_mib() * zeros_mib
    if not complete:
        return out
    crc, chunk = zlib.crc32(prefix), bytes(64 * MIB)
    for _ in range(zeros_mib // 64):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(zeros_mib % 64 * MIB), crc)
    size = len(prefix) + zeros_mib * MIB
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
    return out + final + struct.pack("<II", crc, size & 0xFFFFFFFF)


def zip_of(files: Sequence[tuple[str, bytes]],
           compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


def raw_zip(entries: Sequence[tuple[str, int, bytes, int, int, int]]) -> bytes:
    """A zip by hand, for sizes and flags zipfile would not write: entries of
    ``(name, method, stored bytes, crc, declared size, flag bits)``."""
    local, central = b"", b""
    for name, method, payload, crc, size, flags in entries:
        raw_name = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, 0,
                               0x21, crc, len(payload), size, len(raw_name), 0, 0, 0, 0,
                               0, len(local)) + raw_name
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc,
                             len(payload), size, len(raw_name), 0) + raw_name + payload
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(central), len(local), 0)
    return local + central + end


def deflated(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@contextmanager
def refused(status: int, *words: str, within_s: float = 2.0) -> Iterator[None]:
    """The block raises the ApiError ``status`` naming field 'archive', within ``within_s``."""
    start = time.monotonic()
    with pytest.raises(ApiError) as caught:
        yield
    elapsed = time.monotonic() - start
    err = caught.value
    assert err.status == status, (err.status, err.message)
    assert err.field == "archive", err.field
    for word in words:
        assert word in err.message, (word, err.message)
    assert elapsed < within_s, f"refused after {elapsed:.2f}s"


# --- tar ---------------------------------------------------------------------------------
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "tar": lambda data: data, "bz2": bz2.compress,
    "xz": lambda data: lzma.compress(data, preset=0)}


@pytest.mark.parametrize("bomb_first", [False, True])
def test_tar_gz_member_declaring_20_gib_is_refused_at_its_header(bomb_first: bool) -> None:
    # the battery's bomb: a valid adapter plus a 20 GiB member of zeros (here 64 MiB of them
    # follow its header, enough to show any decompression of its data)
    bomb = tar_member("my-adapter/zeros.bin", size=20 * GIB)
    adapter = b"".join(tar_member(name, data) for name, data in ADAPTER)
    prefix = bomb if bomb_first else adapter + bomb
    with refused(413, str(LIMIT), "zeros.bin"):
        extract_peft(gzip_then_zeros(prefix, 64), "a.tar.gz", LIMIT)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_member_over_budget_is_refused_whatever_the_compression(kind: str) -> None:
    data = b"".join(tar_member(name, body) for name, body in ADAPTER)
    data += tar_member("my-adapter/optimizer.raw", size=20 * GIB) + bytes(8 * MIB)
    with refused(413, "declare", str(LIMIT)):
        extract_peft(COMPRESSORS[kind](data), "a.tar", LIMIT)


def test_skipped_members_count_towards_the_budget() -> None:
    # each skipped member fits the budget; together they do not
    files = [*ADAPTER, *((f"my-adapter/part{i}.raw", bytes(MIB)) for i in range(5))]
    with refused(413, "declare"):
        extract_peft(gzip_then_zeros(tar_of(files), 0, complete=True), "a.tgz", LIMIT)
    assert extract_peft(tar_of(files[:5]), "a.tar", LIMIT) == (CONFIG, WEIGHTS)


@pytest.mark.parametrize("record", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_pax_or_long_name_record_declaring_20_gib_is_never_read(record: bytes) -> None:
    # tarfile reads such a record whole before it yields the member: the decompressed
    # stream itself is bounded
    prefix = tar_member(ADAPTER[0][0], CONFIG) + tar_member("x", size=20 * GIB, type_=record)
    with refused(413, "decompresses past"):
        extract_peft(gzip_then_zeros(prefix, 64), "a.tar.gz", LIMIT)


def test_tar_member_count_is_capped() -> None:
    many = [*ADAPTER, *((f"my-adapter/f{i}", b"") for i in range(5000))]
    with refused(400, "members", str(MAX_ARCHIVE_MEMBERS)):
        extract_peft(gzip_then_zeros(tar_of(many), 0, complete=True), "a.tgz", LIMIT)
    enough = [*ADAPTER, *((f"my-adapter/f{i}", b"") for i in range(MAX_ARCHIVE_MEMBERS - 2))]
    assert extract_peft(tar_of(enough), "a.tar", LIMIT) == (CONFIG, WEIGHTS)


# --- zip ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zip_100k() -> bytes:
    return zip_of([*ADAPTER, *((f"f{i}", b"") for i in range(100_000))],
                  zipfile.ZIP_STORED)


def test_zip_with_100000_members_is_refused_from_its_directory(zip_100k: bytes) -> None:
    with refused(400, "100002 members", str(MAX_ARCHIVE_MEMBERS), within_s=0.5):
        extract_peft(zip_100k, "a.zip", LIMIT)


def test_zip_directory_bigger_than_its_count_says_is_refused() -> None:
    # zipfile walks the central directory by its byte size: a record saying 2 entries
    # over a directory of 5000 is refused by that size, before the walk
    data = bytearray(zip_of([*ADAPTER, *((f"f{i}", b"") for i in range(5000))],
                            zipfile.ZIP_STORED))
    struct.pack_into("<HH", data, len(data) - 22 + 8, 2, 2)
    with refused(400, "central directory"):
        extract_peft(bytes(data), "a.zip", LIMIT)


def test_zip_skipped_members_count_towards_the_budget() -> None:
    data = zip_of([*ADAPTER, ("my-adapter/optimizer.raw", bytes(LIMIT))])
    with refused(413, "declare", "optimizer.raw"):
        extract_peft(data, "a.zip", LIMIT)


def test_zip_member_larger_than_declared_is_read_only_to_the_declared_size() -> None:
    # deflate: the read stops at the declared size (+1); the CRC of the whole data fails
    body = bytes(64 * MIB)
    data = raw_zip([(ADAPTER[0][0], zipfile.ZIP_DEFLATED, deflated(body), zlib.crc32(body),
                     100, 0),
                    (ADAPTER[1][0], zipfile.ZIP_STORED, WEIGHTS, zlib.crc32(WEIGHTS),
                     len(WEIGHTS), 0)])
    with refused(400, "unreadable zip", within_s=1.0):
        extract_peft(data, "a.zip", LIMIT)


def test_zip_bzip2_member_is_refused_before_it_expands() -> None:
    # zipfile decompresses a whole bzip2 chunk at once: 79 bytes here are 64 MiB
    body = bytes(64 * MIB)
    data = raw_zip([(ADAPTER[0][0], zipfile.ZIP_BZIP2, bz2.compress(body), zlib.crc32(body),
                     10, 0)])
    with refused(400, "compression method", within_s=0.5):
        extract_peft(data, "a.zip", LIMIT)


def test_encrypted_zip_member_is_400() -> None:
    data = raw_zip([(ADAPTER[0][0], zipfile.ZIP_STORED, CONFIG, zlib.crc32(CONFIG),
                     len(CONFIG), 0x1)])
    with refused(400, "encrypted"):
        extract_peft(data, "a.zip", LIMIT)


# --- what still works ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar.gz", "tar", "tar.bz2", "zip", "zip-stored"])
def test_peft_folders_are_read(kind: str) -> None:
    files = [*ADAPTER, ("my-adapter/README.md", b"# adapter\n"),
             ("my-adapter/training_args.bin", b"\x80\x04N."),
             ("my-adapter/checkpoint/state.json", b"{}")]
    data = {"tar.gz": lambda: gzip_then_zeros(tar_of(files), 0, complete=True),
            "tar": lambda: tar_of(files),
            "tar.bz2": lambda: bz2.compress(tar_of(files)),
            "zip": lambda: zip_of(files),
            "zip-stored": lambda: zip_of(files, zipfile.ZIP_STORED)}[kind]()
    assert extract_peft(data, f"a.{kind}", LIMIT) == (CONFIG, WEIGHTS)
    # exactly at the budget is fine; one byte less is not
    budget = len(CONFIG) + len(WEIGHTS) + 10 + 4 + 2
    assert extract_peft(data, "a", budget) == (CONFIG, WEIGHTS)
    with refused(413, "declare"):
        extract_peft(data, "a", budget - 1)
