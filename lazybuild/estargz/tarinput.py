"""Input tars as real tools write them: sniff the compression, spool to a seekable file, index entries.

The writer needs random access to payloads (prioritized files move to the front), so, like the
reference's Build, compressed input is first inflated into a temporary file. An uncompressed tar
that is already a regular file is used in place.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import zstandard
from zlib_ng import gzip_ng

from .compression import GZIP_MAGIC, ZSTD_FRAME_MAGIC
from .errors import FormatError, UnsupportedEntryError

COPY_BUFFER = 1 << 20


@dataclass
class TarMember:
    """A tar entry of the spooled input: its header (as tarfile parsed it) and where its payload lies."""

    info: tarfile.TarInfo
    data_offset: int


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
            raise FormatError(f"input is not a readable {kind} stream: {e}") from e
        finally:
            if owned:
                f.close()
        self.file = open(self._tmp, "rb")

    def members(self) -> list[TarMember]:
        """Every entry in stream order. PAX, GNU long names and old V7 headers are tarfile's to parse."""
        self.file.seek(0)
        out = []
        try:
            tf = tarfile.open(fileobj=self.file, mode="r:", encoding="utf-8", errors="surrogateescape")
            while True:
                info = tf.next()
                if info is None:
                    break
                tf.members.clear()  # we keep our own list; don't hold two
                if info.issparse():
                    raise UnsupportedEntryError(f"tar entry {info.name!r} is a GNU sparse file, which eStargz cannot hold")
                out.append(TarMember(info, info.offset_data))
        except tarfile.ReadError as e:
            if not out and self.file.seek(0, os.SEEK_END) == 0:
                return []  # an empty input is an empty layer
            raise FormatError(f"input is not a tar archive: {e}") from e
        except tarfile.TarError as e:
            raise FormatError(f"input tar is corrupt after {len(out)} entries: {e}") from e
        return out

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
