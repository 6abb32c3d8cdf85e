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

from ..errors import InputError
from .errors import FooterError, FormatError, LimitExceeded
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
    digits = payload[:16]
    if digits.strip(b"0123456789abcdefABCDEF"):  # int() would also take a sign or spaces
        raise FooterError(f"TOC offset {digits!r} in the footer is not 16 hex digits")
    return int(digits, 16)


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
            raise InputError(f"gzip compression level {self.level} is not in 0..9")

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
            raise InputError(f"zstd compression level {self.level} is not in 1..22")
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
    raise InputError(f"unknown layer compression {name!r} (want gzip or zstd)")


# --- reading ---------------------------------------------------------------------------------------
# Everything below runs on bytes a stranger wrote, before anything is verified: every size read here
# is checked against the blob or a cap before it drives a read or an allocation, and nothing is ever
# inflated further than what the caller asked for.

# Caps on the TOC, checked before it is fetched and while it is inflated. containers/storage refuses
# TOCs past 150 MiB (pkg/chunked maxTocSize, for the compressed and the raw size alike), so a TOC it
# accepts we accept: 150 MiB of JSON is ~400k files at the ~400 bytes a reference entry takes. TOC
# JSON compresses 4-10x, so 64 MiB compressed already holds any TOC under the raw cap.
MAX_TOC_COMPRESSED_SIZE = 64 << 20
MAX_TOC_SIZE = 150 << 20

INFLATE_STEP = 1 << 20  # what is inflated at a time while skipping to an inner offset


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


class _GzipMember:
    """The uncompressed bytes of the one gzip member at the start of `data`, handed out on demand."""

    def __init__(self, data):
        self._d = zlib_ng.decompressobj(31)
        self._rest = data

    def read(self, n: int) -> bytes:
        pieces, left = [], n
        while left > 0:
            try:
                out = self._d.decompress(self._rest, left)  # max_length: never more than asked for
            except zlib_ng.error as e:
                raise FormatError(f"gzip data does not decompress: {e}") from e
            before, self._rest = len(self._rest), self._d.unconsumed_tail
            pieces.append(out)
            left -= len(out)
            # zlib stops early only at the member's end or when the input runs out (or made no progress)
            if not out and (self._d.eof or not self._rest or len(self._rest) == before):
                break
        return b"".join(pieces)


class _ZstdFrame:
    """The uncompressed bytes of the one zstd frame at the start of `data`, handed out on demand.

    A stream reader decodes only what is read: a frame header that promises 256 MiB costs nothing
    until those bytes are asked for (zstandard's one-shot decompress allocates the promised size)."""

    def __init__(self, data):
        self._r = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        self._ended = False

    def read(self, n: int) -> bytes:
        if self._ended or n <= 0:
            return b""
        try:
            out = self._r.read(n)
        except zstandard.ZstdError as e:
            raise FormatError(f"zstd data does not decompress: {e}") from e
        # The reader fills the whole request unless the frame (or the input) ends first; the next read
        # would go on into the following frame, which belongs to another chunk.
        if len(out) < n:
            self._ended = True
        return out


def open_member(kind: str, data):
    return _ZstdFrame(data) if kind == "zstd" else _GzipMember(data)


def decompress_member(kind: str, data, length: int, skip: int = 0) -> bytes:
    """Bytes [skip, skip+length) of the gzip member / zstd frame at the start of `data`.

    Never inflates past skip+length, so a small member that inflates to gigabytes costs only what was
    asked for; the skipped part is inflated in steps and dropped. Fewer bytes come back if the member
    ends first (the caller's digest check then fails)."""
    member = open_member(kind, data)
    while skip > 0:
        got = len(member.read(min(skip, INFLATE_STEP)))
        if got == 0:
            return b""
        skip -= got
    return member.read(length)


def read_gzip_toc(data, max_size: int | None = None) -> bytes:
    """The raw TOC JSON from the TOC gzip member (tar header `stargz.index.json` + JSON).

    The tar header gives the size; it is checked against the cap before the JSON is inflated."""
    cap = MAX_TOC_SIZE if max_size is None else max_size
    member = _GzipMember(data)
    try:
        header = member.read(TAR_BLOCK)
    except FormatError as e:
        raise FormatError(f"TOC member does not gunzip: {e}") from e
    if len(header) < TAR_BLOCK:
        raise FormatError("TOC member is shorter than one tar header")
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise FormatError(f"TOC member does not start with a tar header: {e}") from e
    if info.name != TOC_TAR_NAME:
        raise FormatError(f"TOC tar entry is {info.name!r}, want {TOC_TAR_NAME!r}")
    if info.size < 0:
        raise FormatError(f"TOC tar header gives a negative size ({info.size})")
    if info.size > cap:
        raise LimitExceeded(f"TOC is {_mib(info.size)} uncompressed, more than the {_mib(cap)} cap on a TOC "
                            "(estargz.compression.MAX_TOC_SIZE); split the layer if it really has that many files")
    try:
        toc = member.read(info.size)
    except FormatError as e:
        raise FormatError(f"TOC member does not gunzip: {e}") from e
    if len(toc) != info.size:
        raise FormatError(f"TOC is truncated: {len(toc)} of the {info.size} bytes its tar header gives")
    return toc


def read_zstd_toc(data, raw_size: int, max_size: int | None = None) -> bytes:
    cap = MAX_TOC_SIZE if max_size is None else max_size
    if raw_size > cap:
        raise LimitExceeded(f"zstd footer gives a TOC of {_mib(raw_size)} uncompressed, more than the {_mib(cap)} cap "
                            "on a TOC (estargz.compression.MAX_TOC_SIZE)")
    try:
        toc = _ZstdFrame(data).read(raw_size + 1)  # one byte more tells a frame longer than the footer says
    except FormatError as e:
        raise FormatError(f"zstd TOC does not decompress: {e}") from e
    if len(toc) != raw_size:
        more = "more than" if len(toc) > raw_size else f"{len(toc)} bytes, not"
        raise FormatError(f"zstd TOC is {more} the {raw_size} bytes the footer says")
    return toc
