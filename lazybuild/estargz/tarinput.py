"""Input tars as real tools write them: sniff the compression, spool to a seekable file, index entries.

The writer needs random access to payloads (prioritized files move to the front), so, like the
reference's Build, compressed input is first inflated into a temporary file. An uncompressed tar
that is already a regular file is used in place.
"""

from __future__ import annotations

import math
import os
import shutil
import tarfile
import tempfile
from typing import BinaryIO

import zstandard
from zlib_ng import gzip_ng

from .compression import GZIP_MAGIC, ZSTD_FRAME_MAGIC
from .errors import FormatError, LimitExceeded, UnsupportedEntryError

COPY_BUFFER = 1 << 20
XATTR_PAX_PREFIX = "SCHILY.xattr."


class TarHeader:
    """One tar entry as the writer needs it. Slotted: a 2 GiB layer has 100,000+ of them in memory."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "uname", "gname",
                 "devmajor", "devminor", "xattrs", "offset")

    def __init__(self, name: str, type: bytes = tarfile.REGTYPE, mode: int = 0, size: int = 0):
        self.name, self.type, self.mode, self.size = name, type, mode, size
        self.uid = self.gid = self.devmajor = self.devminor = self.offset = 0
        self.mtime: float = 0
        self.linkname = self.uname = self.gname = ""
        self.xattrs: dict[str, bytes] | None = None

    def isreg(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE

    def tobuf(self) -> bytes:
        """A fresh PAX-format header for this entry (the writer copies input headers when it can)."""
        info = tarfile.TarInfo(self.name)
        for attr in ("type", "mode", "uid", "gid", "size", "mtime", "linkname", "uname", "gname", "devmajor", "devminor"):
            setattr(info, attr, getattr(self, attr))
        if self.xattrs:
            info.pax_headers = {XATTR_PAX_PREFIX + k: v.decode("utf-8", "surrogateescape") for k, v in self.xattrs.items()}
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarMember:
    """A tar entry of the spooled input: its header and where its payload lies.

    `info.offset` is where its header blocks start (extension headers included), so the writer can
    copy them as they are; `data_offset` is -1 for entries we make (landmarks).
    """

    __slots__ = ("info", "data_offset")

    def __init__(self, info: TarHeader, data_offset: int):
        self.info, self.data_offset = info, data_offset


def sniff(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_FRAME_MAGIC):
        return "zstd"
    return "tar"


class SpooledTar:
    """A seekable, uncompressed copy of an input tar (or the input itself when it already is one)."""

    def __init__(self, source: str | BinaryIO, tmpdir: str | None = None):
        self._tmp: str | None = None
        self.name = source if isinstance(source, str) and source != "-" else "<stdin>"
        owned = isinstance(source, str)
        if isinstance(source, str) and source != "-":
            f = open(source, "rb")
            kind = sniff(f.read(4))
            f.seek(0)
            if kind == "tar":
                self.file = f
                self.input_compression = kind
                return
        else:
            f = os.fdopen(os.dup(0), "rb") if source == "-" else source
            f = _Peekable(f)
            kind = sniff(f.peek4())
        self.input_compression = kind
        fd, self._tmp = tempfile.mkstemp(prefix="lazybuild-tar-", dir=tmpdir)
        try:
            with os.fdopen(fd, "wb") as out:
                if kind == "gzip":
                    with gzip_ng.GzipFile(fileobj=f, mode="rb") as gz:
                        shutil.copyfileobj(gz, out, COPY_BUFFER)
                elif kind == "zstd":
                    with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zs:
                        shutil.copyfileobj(zs, out, COPY_BUFFER)
                else:
                    shutil.copyfileobj(f, out, COPY_BUFFER)
        except (OSError, EOFError, zstandard.ZstdError) as e:
            self.close()
            raise FormatError(f"{self.name}: input is not a readable {kind} stream: {e}") from e
        finally:
            if owned:
                f.close()
        self.file = open(self._tmp, "rb")

    def members(self) -> list[TarMember]:
        """Every entry in stream order, parsed by read_members."""
        try:
            return read_members(self.file.fileno())
        except (FormatError, UnsupportedEntryError) as e:
            raise type(e)(f"{self.name}: {e}") from None

    def pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.file.fileno(), size, offset)
        if len(data) != size:
            raise FormatError(f"input tar is truncated: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    def close(self) -> None:
        if getattr(self, "file", None):
            self.file.close()
        if self._tmp:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Peekable:
    """A non-seekable stream (stdin, a pipe) whose first bytes can be looked at before it is read."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._head = b""

    def peek4(self) -> bytes:
        while len(self._head) < 4:
            more = self._f.read(4 - len(self._head))
            if not more:
                break
            self._head += more
        return self._head

    def read(self, n: int = -1) -> bytes:
        head, self._head = self._head, b""
        if n is None or n < 0:
            return head + self._f.read()
        if len(head) >= n:
            self._head = head[n:]
            return head[:n]
        return head + self._f.read(n - len(head))

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()


# --- the tar header parser --------------------------------------------------------------------------
# tarfile parses headers ~10x slower than this and the parse is serial work before compression can
# start; so we read USTAR/GNU/PAX headers ourselves.

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
_HEADER_ONLY = {tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE}


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, offset: int) -> int:
    if field[0] & 0x80:  # GNU base-256: 0x80 positive, 0xff negative
        return int.from_bytes(field, "big", signed=True) if field[0] == 0xFF else int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    if digits.strip(b"01234567"):  # int() would also take a sign or underscores
        raise FormatError(f"input tar: bad number {field!r} in the header at offset {offset} (not octal)")
    return int(digits, 8) if digits else 0


def _signed_checksum(block: bytes) -> int:
    """Some old tars summed the header as signed chars."""
    signed = [b - 256 if b > 127 else b for b in block]
    return sum(signed) - sum(signed[148:156]) + 256


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data) and data[i] != 0:
        space = data.find(b" ", i, i + 20)  # "%d " with at most 19 digits: a length can't be longer
        try:
            length = int(data[i:space]) if space > i else 0
        except ValueError:
            length = 0
        record = data[space + 1 : i + length]
        # length must cover its own "%d " prefix, so every record moves i forward
        if length <= space - i or i + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise FormatError(f"input tar: bad PAX record at byte {i} of the extended header at offset {offset}")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


# Go's archive/tar refuses PAX records and GNU long names past 1 MiB (maxSpecialFileSize): no real
# name or attribute set is that long, and each is read into memory whole.
MAX_EXTENDED_HEADER = 1 << 20


def _pax_int(pax: dict[str, str], key: str, default: int, pos: int) -> int:
    if key not in pax:
        return default
    try:
        return int(pax[key])
    except ValueError:
        raise FormatError(f"input tar: PAX {key}={pax[key][:40]!r} of the header at offset {pos} is not a number") from None


def read_members(fd: int) -> list[TarMember]:
    """Parse every header of the tar in `fd`: USTAR (with prefix), GNU long names/links, PAX local and
    global records, base-256 numbers. GNU sparse files are refused: eStargz cannot hold them.

    The input is a stranger's: every size is checked against the file before it moves the position or
    sizes a read, so each header moves forward by at least one block and the loop always ends."""
    out: list[TarMember] = []
    pos = 0
    file_size = os.fstat(fd).st_size
    global_pax: dict[str, str] = {}
    local_pax: dict[str, str] = {}
    long_name = long_link = None
    first_block = None  # where the current member's header blocks begin
    while True:
        block = os.pread(fd, BLOCK, pos)
        if len(block) == 0 or block == ZERO_BLOCK:
            break  # end of archive (two zero blocks, or a stream cut right after a member as tools accept)
        if len(block) < BLOCK:
            if pos == 0:
                raise FormatError(f"input is not a tar archive ({len(block)} bytes, less than one header)")
            raise FormatError(f"input tar is truncated at offset {pos}")
        try:
            stored = _number(block[148:156], pos)
        except FormatError:
            stored = None  # not even a number: reported as a bad checksum below
        if stored != sum(block) - sum(block[148:156]) + 256 and stored != _signed_checksum(block):
            what = "input is not a tar archive" if pos == 0 else f"input tar is corrupt at offset {pos}"
            raise FormatError(f"{what}: header checksum {bytes(block[148:156])!r} does not match the header")
        kind = block[156:157]
        size = _number(block[124:136], pos)
        data_offset = pos + BLOCK
        if size < 0:  # a GNU base-256 negative size would move the position backwards: a loop forever
            raise FormatError(f"input tar is corrupt: the header at offset {pos} gives a negative size ({size})")
        next_pos = data_offset + -(-size // BLOCK) * BLOCK
        if first_block is None:
            first_block = pos
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, b"X"):
            if size > MAX_EXTENDED_HEADER:
                raise LimitExceeded(f"input tar: the extended header (type {kind.decode('latin-1')!r}) at offset {pos} "
                                    f"is {size} bytes, past the {MAX_EXTENDED_HEADER >> 20} MiB cap on PAX records "
                                    "and GNU long names")
            data = os.pread(fd, size, data_offset)
            if len(data) != size:
                raise FormatError(f"input tar is truncated in the extended header at offset {pos}")
            if kind == tarfile.XGLTYPE:
                global_pax.update(_pax_records(data, pos))
                if first_block == pos:
                    first_block = None  # a global header belongs to no member
            elif kind in (tarfile.XHDTYPE, b"X"):
                local_pax.update(_pax_records(data, pos))
            elif kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                long_link = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            pos = next_pos
            continue

        pax = {**global_pax, **local_pax} if global_pax else local_pax
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar prefix (GNU has no prefix field)
            name = _text(block[345:500]) + "/" + name
        name = pax.get("path", long_name if long_name is not None else name)
        info = TarHeader(name, kind)
        if "\0" in name:  # only a PAX path can carry one; no file system takes it
            raise FormatError(f"input tar: entry {name!r} (header at offset {pos}) has a NUL byte in its name")
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            info.type = tarfile.DIRTYPE  # old V7 directories
        if kind == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax):
            raise UnsupportedEntryError(f"tar entry {name!r} is a GNU sparse file, which eStargz cannot hold")
        info.mode = _number(block[100:108], pos)
        info.uid = _pax_int(pax, "uid", _number(block[108:116], pos), pos)
        info.gid = _pax_int(pax, "gid", _number(block[116:124], pos), pos)
        info.size = _pax_int(pax, "size", size, pos)
        try:
            info.mtime = float(pax["mtime"]) if "mtime" in pax else _number(block[136:148], pos)
        except ValueError:
            raise FormatError(f"input tar: PAX mtime of {name!r} (header at offset {pos}) is not a number") from None
        if not math.isfinite(info.mtime):
            raise FormatError(f"input tar: PAX mtime of {name!r} (header at offset {pos}) is {info.mtime}")
        # Negative ids, modes or sizes (base-256 or PAX) would reach the TOC, which refuses them.
        if (info.mode | info.uid | info.gid) >> 32 or not 0 <= info.size < 1 << 62:
            raise FormatError(f"input tar: entry {name!r} (header at offset {pos}) has a negative or absurd mode, "
                              f"uid, gid or size ({info.mode:o}, {info.uid}, {info.gid}, {info.size})")
        info.linkname = pax.get("linkpath", long_link if long_link is not None else _text(block[157:257]))
        info.uname = pax.get("uname", _text(block[265:297]))
        info.gname = pax.get("gname", _text(block[297:329]))
        if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = _number(block[329:337], pos), _number(block[337:345], pos)
            if (info.devmajor | info.devminor) >> 32:
                raise FormatError(f"input tar: device {name!r} (header at offset {pos}) has a negative or absurd number")
        xattrs = {k[len(XATTR_PAX_PREFIX):]: v.encode("utf-8", "surrogateescape") for k, v in pax.items() if k.startswith(XATTR_PAX_PREFIX)}
        info.xattrs = xattrs or None
        info.offset = first_block
        if info.type not in _HEADER_ONLY and data_offset + info.size > file_size:
            raise FormatError(f"input tar is truncated in the payload of {name!r}: {info.size} bytes at offset "
                              f"{data_offset}, the input has {file_size}")
        out.append(TarMember(info, data_offset))
        if info.type not in _HEADER_ONLY:  # header-only types carry no payload whatever size says
            next_pos = data_offset + -(-info.size // BLOCK) * BLOCK
        else:
            next_pos = data_offset
        pos = next_pos
        local_pax, long_name, long_link, first_block = {}, None, None, None
    return out
