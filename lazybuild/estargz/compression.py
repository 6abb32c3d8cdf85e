"""The only place that knows gzip and zstd framing: members/frames, the TOC trailer and the footers.

Everything else in the format (sorting, chunking, the TOC model) is shared by both, as in
stargz-snapshotter where `zstdchunked` is a Compressor/Decompressor pair beside gzip
(reference/estargz.md §1.4, §2.1).
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
import threading

import zstandard
from zlib_ng import zlib_ng

from .errors import FooterError, FormatError
from .toc import (
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_ZSTD,
    TOC_TAR_NAME,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
)

TAR_BLOCK = 512
TAR_EOF = b"\0" * 1024

GZIP_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40  # the skippable frame around it makes 48 bytes on disk
MAX_FOOTER_SIZE = 51 + 8  # read this much of the tail to try every footer

ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"  # stargz-snapshotter's; containers/storage now writes GNUlInUx (64 bytes)
ZSTD_MANIFEST_TYPE_CRFS = 1
GZIP_MAGIC = b"\x1f\x8b"


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % TAR_BLOCK)


def toc_tar_header(toc_size: int) -> bytes:
    """The USTAR header of `stargz.index.json`: mode, owner and mtime 0, as Go's tar.Header{} writes them."""
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size, info.mode, info.mtime, info.uname, info.gname = toc_size, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT)


def gzip_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose FEXTRA subfield `SG` holds `%016xSTARGZ`."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + b"\0" * 8  # empty stored final block, CRC32=0, ISIZE=0


def _parse_stargz_payload(payload: bytes) -> int:
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        raise FooterError("no STARGZ marker")
    try:
        return int(payload[:16], 16)
    except ValueError as e:
        raise FooterError("TOC offset in the footer is not hex") from e


def parse_gzip_footer(tail: bytes) -> int:
    f = tail[-GZIP_FOOTER_SIZE:]
    if len(f) != GZIP_FOOTER_SIZE or f[:4] != b"\x1f\x8b\x08\x04" or f[10:12] != b"\x1a\x00":
        raise FooterError("not a 51-byte eStargz footer")
    if f[12:14] != b"SG" or f[14:16] != b"\x16\x00":
        raise FooterError("eStargz footer without the SG subfield")
    return _parse_stargz_payload(f[16:38])


def parse_legacy_footer(tail: bytes) -> int:
    f = tail[-LEGACY_FOOTER_SIZE:]
    if len(f) != LEGACY_FOOTER_SIZE or f[:4] != b"\x1f\x8b\x08\x04" or f[10:12] != b"\x16\x00":
        raise FooterError("not a 47-byte legacy stargz footer")
    return _parse_stargz_payload(f[12:34])


def zstd_footer(toc_offset: int, compressed_toc_size: int, raw_toc_size: int) -> bytes:
    """40 bytes: LE64 tocOffset | LE64 compressed TOC size | LE64 raw TOC size | LE64 type 1 | GnUlInUx."""
    return struct.pack("<QQQQ", toc_offset, compressed_toc_size, raw_toc_size, ZSTD_MANIFEST_TYPE_CRFS) + ZSTD_CHUNKED_MAGIC


def parse_zstd_footer(tail: bytes) -> tuple[int, int, int]:
    f = tail[-ZSTD_FOOTER_SIZE:]
    if len(f) != ZSTD_FOOTER_SIZE or f[32:] != ZSTD_CHUNKED_MAGIC:
        raise FooterError("not a zstd:chunked (GnUlInUx) footer")
    toc_offset, compressed, raw, kind = struct.unpack("<QQQQ", f[:32])
    if kind != ZSTD_MANIFEST_TYPE_CRFS:
        raise FooterError(f"zstd footer manifest type {kind} is not 1 (CRFS)")
    return toc_offset, compressed, raw


def skippable_frame(data: bytes) -> bytes:
    return ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(data)) + data


class Gzip:
    """eStargz with gzip: one gzip member per payload chunk, TOC in a tar entry, 51-byte footer."""

    name = "gzip"
    media_type = MEDIA_TYPE_GZIP
    default_level = 6  # BuildKit's default; zlib-ng's 6 is within ~1% of Go's level 9 size (bench/convert.py)

    def __init__(self, level: int | None = None):
        self.level = self.default_level if level is None else level
        if not 0 <= self.level <= 9:
            raise ValueError(f"gzip compression level {self.level} is not in 0..9")

    def compress_member(self, data: bytes) -> bytes:
        """One complete gzip member. Thread-safe: zlib-ng releases the GIL while it deflates."""
        c = zlib_ng.compressobj(self.level, zlib_ng.DEFLATED, 31)
        return c.compress(data) + c.flush()

    def write_trailer(self, sink, toc_offset: int, toc_parts: list[bytes]) -> dict[str, str]:
        """Write the TOC member and footer to `sink` (`.write(compressed)`, `.add_raw(uncompressed)`).

        The TOC is a tar entry here, so its bytes and the tar EOF are part of the diffID stream.
        Returns the annotations this compression adds (none for gzip).
        """
        c = zlib_ng.compressobj(self.level, zlib_ng.DEFLATED, 31)
        toc_size = sum(len(p) for p in toc_parts)
        for raw in (toc_tar_header(toc_size), *toc_parts, tar_padding(toc_size) + TAR_EOF):
            sink.add_raw(raw)
            sink.write(c.compress(raw))
        sink.write(c.flush() + gzip_footer(toc_offset))
        return {}


class Zstd:
    """stargz-snapshotter's "eStargz with zstd": zstd frames, TOC and footer in skippable frames, no tar EOF."""

    name = "zstd"
    media_type = MEDIA_TYPE_ZSTD
    default_level = 3  # zstd.SpeedDefault in the reference

    def __init__(self, level: int | None = None):
        self.level = self.default_level if level is None else level
        if not 1 <= self.level <= 22:
            raise ValueError(f"zstd compression level {self.level} is not in 1..22")
        self._local = threading.local()  # a ZstdCompressor must not be shared between threads

    def compress_member(self, data: bytes) -> bytes:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c.compress(data)

    def write_trailer(self, sink, toc_offset: int, toc_parts: list[bytes]) -> dict[str, str]:
        """The TOC, zstd-compressed, in a skippable frame, then the footer in another: neither is part of
        the decompressed stream, so nothing is added to the diffID."""
        c = zstandard.ZstdCompressor(level=self.level).compressobj()
        compressed_toc = b"".join(c.compress(p) for p in toc_parts) + c.flush()
        toc_size = sum(len(p) for p in toc_parts)
        toc_data_offset = toc_offset + 8  # the footer points past the skippable frame's 8-byte header
        sink.write(skippable_frame(compressed_toc))
        sink.write(skippable_frame(zstd_footer(toc_data_offset, len(compressed_toc), toc_size)))
        return {
            ZSTD_MANIFEST_CHECKSUM_ANNOTATION: "sha256:" + hashlib.sha256(compressed_toc).hexdigest(),
            ZSTD_MANIFEST_POSITION_ANNOTATION: f"{toc_data_offset}:{len(compressed_toc)}:{toc_size}:{ZSTD_MANIFEST_TYPE_CRFS}",
        }


def compression_for(name: str, level: int | None = None):
    if name == "gzip":
        return Gzip(level)
    if name == "zstd":
        return Zstd(level)
    raise ValueError(f"unknown layer compression {name!r} (want gzip or zstd)")


# --- reading ---------------------------------------------------------------------------------------


def decompress_member(kind: str, data: bytes, max_length: int) -> bytes:
    """The first `max_length` uncompressed bytes of the gzip member / zstd frame at the start of `data`."""
    try:
        if kind == "zstd":
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(data)
            return out[:max_length]
        d = zlib_ng.decompressobj(31)
        return d.decompress(data, max_length)
    except (zlib_ng.error, zstandard.ZstdError) as e:
        raise FormatError(f"{kind} data does not decompress: {e}") from e


def read_gzip_toc(data: bytes) -> bytes:
    """The raw TOC JSON from the TOC gzip member (tar header `stargz.index.json` + JSON)."""
    try:
        d = zlib_ng.decompressobj(31)
        raw = d.decompress(data)
    except zlib_ng.error as e:
        raise FormatError(f"TOC member does not gunzip: {e}") from e
    if len(raw) < TAR_BLOCK:
        raise FormatError("TOC member is shorter than one tar header")
    try:
        info = tarfile.TarInfo.frombuf(raw[:TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise FormatError(f"TOC member does not start with a tar header: {e}") from e
    if info.name != TOC_TAR_NAME:
        raise FormatError(f"TOC tar entry is {info.name!r}, want {TOC_TAR_NAME!r}")
    toc = raw[TAR_BLOCK : TAR_BLOCK + info.size]
    if len(toc) != info.size:
        raise FormatError("TOC is truncated")
    return toc


def read_zstd_toc(data: bytes, raw_size: int) -> bytes:
    try:
        toc = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as e:
        raise FormatError(f"zstd TOC does not decompress: {e}") from e
    if len(toc) != raw_size:
        raise FormatError(f"zstd TOC is {len(toc)} bytes, the footer says {raw_size}")
    return toc
