"""tar -> eStargz (gzip) or eStargz-with-zstd, streaming, with members compressed in parallel.

Byte layout (reference/estargz.md §1.1-1.2): a file's tar header goes at the end of the *previous*
member; each payload chunk opens a member; tar padding and the headers of following non-payload
entries share the chunk's member; the TOC and footer close the blob. Members are independent, so
they are compressed on a thread pool (zlib-ng and zstandard release the GIL) and written in order;
memory stays bounded by the few chunks in flight.
"""

from __future__ import annotations

import collections
import hashlib
import os
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from ..errors import InputError
from .compression import compression_for, tar_padding
from .errors import PrioritizedFileNotFound, UnsafeEntryError, UnsupportedEntryError
from .order import sort_members
from .reader import MAX_CHUNK_SIZE
from .tarinput import SpooledTar, TarHeader, TarMember
from .toc import (
    LANDMARK_CONTENTS,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    TOCEntry,
    NO_XATTRS,
    format_modtime,
    safe_name,
    toc_json_parts,
)

DEFAULT_CHUNK_SIZE = 4 << 20
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()

_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class LayerBlob:
    """What the writer knew about the blob it wrote: callers never recompute it."""

    digest: str
    size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int
    media_type: str
    annotations: dict[str, str]
    missed_prioritized: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "digest": self.digest,
            "size": self.size,
            "tocDigest": self.toc_digest,
            "diffID": self.diff_id,
            "uncompressedSize": self.uncompressed_size,
            "mediaType": self.media_type,
            "annotations": self.annotations,
        }


@dataclass
class _Member:
    """The uncompressed bytes of one member: literal pieces and (offset, length) ranges of the input."""

    pieces: list = field(default_factory=list)
    chunk: TOCEntry | None = None  # the payload chunk this member starts with
    chunk_size: int = 0
    file_hash: "hashlib._Hash | None" = None  # for files of several chunks: the whole-file digest
    file_entry: TOCEntry | None = None  # the reg entry whose digest that hash fills in
    last_chunk: bool = False


def _entry_type(info: TarHeader) -> str:
    if info.isreg():
        return "reg"
    t = _TYPES.get(info.type)
    if t is None:
        raise UnsupportedEntryError(f"tar entry {info.name!r} has type {info.type!r}, which eStargz cannot hold")
    return t


def _header(m: TarMember, kind: str):
    """The entry's header blocks: the input's own bytes (PAX/GNU extension blocks included) whenever
    they can stand as they are, which keeps the layer lossless and costs no re-encoding."""
    info = m.info
    if m.data_offset >= 0 and (kind == "reg" or info.size == 0):
        return (info.offset, m.data_offset - info.offset)
    # A landmark, or a non-file entry that claims a payload (which we drop): write a fresh header.
    info.size = 0 if kind != "reg" else info.size
    try:
        return info.tobuf()
    except ValueError as e:
        raise UnsupportedEntryError(f"tar entry {info.name!r} cannot be re-encoded: {e}") from e


class _Names:
    """userName/groupName are written only when they change for that uid/gid (Go `nameIfChanged`)."""

    def __init__(self):
        self.last: dict[int, str] = {}

    def if_changed(self, ident: int, name: str) -> str:
        if not name or self.last.get(ident) == name:
            return ""
        self.last[ident] = name
        return name


def build(
    source: str | BinaryIO,
    out: BinaryIO,
    *,
    compression: str = "gzip",
    level: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: list[str] = (),
    allow_prioritized_not_found: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    tmpdir: str | None = None,
) -> LayerBlob:
    """Write the eStargz form of the tar `source` (path, '-' or stream; plain, gzip or zstd) to `out`.

    `progress(done_bytes, total_bytes)` is called as the uncompressed stream is written.
    """
    if chunk_size <= 0:
        raise InputError("chunk size must be positive")
    if chunk_size > MAX_CHUNK_SIZE:  # readers (ours included) refuse larger chunks: they are inflated whole
        raise InputError(f"chunk size {chunk_size} is past the {MAX_CHUNK_SIZE >> 20} MiB a reader accepts")
    comp = compression_for(compression, level)
    with SpooledTar(source, tmpdir) as tar:
        members = tar.members()
        try:
            for m in members:
                safe_name(m.info.name, "tar entry")
                if m.info.islnk():
                    safe_name(m.info.linkname, f"hardlink {m.info.name!r} -> target")
            ordered, missed = sort_members(members, list(prioritized_files), allow_prioritized_not_found)
            del members  # _write consumes `ordered`; nothing else may hold the headers
            blob = _write(tar, ordered, out, comp, chunk_size, workers or os.cpu_count() or 1, progress)
        except (UnsafeEntryError, UnsupportedEntryError, PrioritizedFileNotFound) as e:
            raise type(e)(f"{tar.name}: {e}") from None  # name the layer as well as the entry
    blob.missed_prioritized = missed
    return blob


class _Pipeline:
    """Members go to the pool in batches (thousands of small files would otherwise cost a thread
    hand-off each) and come back in order; offsets and digests are filled in as they are written."""

    BATCH_MEMBERS = 512

    def __init__(self, tar: SpooledTar, comp, out: BinaryIO, pool: ThreadPoolExecutor, workers: int, batch_bytes: int, progress):
        self.tar, self.comp, self.out, self.pool, self.progress = tar, comp, out, pool, progress
        self.total_size = os.fstat(tar.file.fileno()).st_size  # the uncompressed input: what progress counts to
        self.max_in_flight = workers + 2
        self.batch_bytes = batch_bytes
        self.batch: list[_Member] = []
        self.batch_size = 0
        self.in_flight: collections.deque = collections.deque()
        self.blob_hash, self.diff_hash = hashlib.sha256(), hashlib.sha256()
        self.blob_size = self.raw_size = 0

    def add(self, member: _Member) -> None:
        if not member.pieces:
            return
        self.batch.append(member)
        self.batch_size += sum(p[1] if isinstance(p, tuple) else len(p) for p in member.pieces)
        if self.batch_size >= self.batch_bytes or len(self.batch) >= self.BATCH_MEMBERS:
            self._submit()

    def _submit(self) -> None:
        if self.batch:
            self.in_flight.append((self.batch, self.pool.submit(self._compress, self.batch)))
            self.batch, self.batch_size = [], 0
        while len(self.in_flight) > self.max_in_flight:
            self._drain()

    def _compress(self, batch: list[_Member]) -> list[tuple[bytes, bytes, str]]:
        done = []
        for member in batch:
            raw = b"".join(self.tar.pread(*p) if isinstance(p, tuple) else p for p in member.pieces)
            chunk_digest = ""
            if member.chunk is not None:
                chunk_digest = "sha256:" + hashlib.sha256(memoryview(raw)[: member.chunk_size]).hexdigest()
            done.append((self.comp.compress_member(raw), raw, chunk_digest))
        return done

    def _drain(self) -> None:
        batch, future = self.in_flight.popleft()
        results = future.result()
        offset = self.blob_size
        for member, (compressed, raw, chunk_digest) in zip(batch, results):
            if member.chunk is not None:
                member.chunk.offset = offset
                member.chunk.chunk_digest = chunk_digest
                if member.file_hash is not None:
                    member.file_hash.update(memoryview(raw)[: member.chunk_size])
                    if member.last_chunk:
                        member.file_entry.digest = "sha256:" + member.file_hash.hexdigest()
                elif member.file_entry is not None:
                    member.file_entry.digest = chunk_digest  # one chunk: the file digest is the chunk digest
            offset += len(compressed)
            self.raw_size += len(raw)
            self.diff_hash.update(raw)
        compressed = b"".join(r[0] for r in results)
        del results
        self.write(compressed)
        if self.progress:
            self.progress(self.raw_size, self.total_size)

    def write(self, compressed: bytes) -> None:
        """Append compressed bytes to the blob (also the trailer's sink interface)."""
        self.out.write(compressed)
        self.blob_hash.update(compressed)
        self.blob_size += len(compressed)

    def add_raw(self, raw: bytes) -> None:
        """Account uncompressed bytes that belong to the diffID stream."""
        self.diff_hash.update(raw)
        self.raw_size += len(raw)

    def finish(self) -> None:
        self._submit()
        while self.in_flight:
            self._drain()


def _write(tar: SpooledTar, ordered: list[TarMember], out: BinaryIO, comp, chunk_size: int, workers: int, progress) -> LayerBlob:
    toc: list[TOCEntry] = []
    users, groups = _Names(), _Names()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz") as pool:
        pipe = _Pipeline(tar, comp, out, pool, workers, max(chunk_size, 1 << 20), progress)
        emit = pipe.add
        member = _Member()
        for i, m in enumerate(ordered):
            ordered[i] = None  # free each input header once its entry exists: memory stays flat
            info = m.info
            kind = _entry_type(info)
            ent = TOCEntry(
                name=info.name + ("/" if kind == "dir" and not info.name.endswith("/") else ""),
                type=kind,
                mode=info.mode,
                uid=info.uid,
                gid=info.gid,
                user_name=users.if_changed(info.uid, info.uname),
                group_name=groups.if_changed(info.gid, info.gname),
                modtime=format_modtime(info.mtime),
                xattrs=info.xattrs or NO_XATTRS,
            )
            if kind == "reg":
                ent.size = info.size
            if kind in ("symlink", "hardlink"):
                ent.link_name = info.linkname
            if kind in ("char", "block"):
                ent.dev_major, ent.dev_minor = info.devmajor, info.devminor
            header = _header(m, kind)
            if isinstance(header, bytes):
                ent.mode &= 0o7777  # a re-encoded header holds only the permission bits
            member.pieces.append(header)

            if kind != "reg" or ent.size == 0:
                if kind == "reg":
                    ent.digest = EMPTY_DIGEST
                toc.append(ent)
                continue

            file_entry, size, done = ent, ent.size, 0
            file_hash = hashlib.sha256() if size > chunk_size else None
            while done < size:
                emit(member)
                this = min(chunk_size, size - done)
                if size - done >= chunk_size:
                    ent.chunk_size = chunk_size  # the reference's quirk: set whenever remain >= chunk size
                ent.chunk_offset = done
                data = LANDMARK_CONTENTS if m.data_offset < 0 else (m.data_offset + done, this)
                member = _Member(
                    pieces=[data],
                    chunk=ent,
                    chunk_size=this,
                    file_hash=file_hash,
                    file_entry=file_entry,
                    last_chunk=done + this == size,
                )
                toc.append(ent)
                done += this
                ent = TOCEntry(name=info.name, type="chunk")
            member.pieces.append(tar_padding(size))
        emit(member)
        pipe.finish()

    ordered.clear()  # the input's headers are no longer needed; the TOC entries are all we keep
    toc_parts = toc_json_parts(_consume(toc))  # entries are freed as their JSON is made
    toc_hash = hashlib.sha256()
    for part in toc_parts:
        toc_hash.update(part)
    toc_digest = "sha256:" + toc_hash.hexdigest()
    extra_annotations = comp.write_trailer(pipe, pipe.blob_size, toc_parts)
    uncompressed_size = pipe.raw_size
    return LayerBlob(
        digest="sha256:" + pipe.blob_hash.hexdigest(),
        size=pipe.blob_size,
        toc_digest=toc_digest,
        diff_id="sha256:" + pipe.diff_hash.hexdigest(),
        uncompressed_size=uncompressed_size,
        media_type=comp.media_type,
        annotations={
            TOC_DIGEST_ANNOTATION: toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(uncompressed_size),
            **extra_annotations,
        },
    )


def _consume(items: list):
    for i, item in enumerate(items):
        items[i] = None
        yield item


def convert_file(src: str, dest: str, **options) -> LayerBlob:
    """build() into `dest`, written under a temporary name in the same directory and renamed when complete."""
    directory = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=".lazybuild-", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            blob = build(src, out, **options)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        return blob
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
