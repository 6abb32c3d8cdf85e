"""Open an eStargz / legacy stargz / eStargz-with-zstd blob by its footer and serve it from its TOC.

The reader only needs `size` and `read_at(offset, length)` from its blob, so the mounter can hand it
a registry-backed blob and fetch exactly the compressed range of a chunk
(`LayerReader.compressed_range`). Every payload returned has been checked against its chunkDigest.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from . import compression as c
from .errors import ChunkDigestMismatch, FooterError, FormatError, TOCDigestMismatch, UnsafeEntryError
from .toc import ENTRY_TYPES, TOCEntry, parse_toc_json, safe_name


TAIL_READ_BYTES = 256 << 10


class Blob(Protocol):
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileBlob:
    """A blob in a local file."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: wanted {length} bytes at {offset}, the file has {self.size}")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(eq=False)
class Node:
    """A name in the layer tree. Hardlinks share the `entry` of their target, as in the reference."""

    path: str
    entry: TOCEntry
    children: dict[str, "Node"] = field(default_factory=dict)
    nlink: int = 1


class LayerReader:
    def __init__(self, blob: Blob, name: str = "layer", toc: tuple[str, int, bytes] | None = None):
        """`toc`: what fetch_toc() returned, when the footer and TOC were read earlier."""
        self.blob = blob
        self.name = name  # used in every error message
        self.kind, self.toc_offset, self.raw_toc = toc if toc is not None else self._read_toc()
        self.toc_digest = "sha256:" + hashlib.sha256(self.raw_toc).hexdigest()
        try:
            self.entries = parse_toc_json(self.raw_toc)
        except FormatError as e:
            raise FormatError(f"{self.name}: {e}") from e
        self._index()

    @classmethod
    def fetch_toc(cls, blob: Blob, name: str = "layer") -> tuple[str, int, bytes]:
        """Only the reads of opening (footer, TOC): (kind, TOC offset, raw TOC JSON), parsed nothing yet."""
        half = cls.__new__(cls)
        half.blob, half.name = blob, name
        return half._read_toc()

    @classmethod
    def open_file(cls, path: str) -> "LayerReader":
        blob = FileBlob(path)
        try:
            return cls(blob, name=path)
        except BaseException:
            blob.close()
            raise

    def close(self) -> None:
        close = getattr(self.blob, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- footer and TOC ----------------------------------------------------------------------------

    def _read_toc(self) -> tuple[str, int, bytes]:
        size = self.blob.size
        if size < c.ZSTD_FOOTER_SIZE:
            raise FooterError(f"{self.name}: {size} bytes is too short to be an eStargz layer (truncated?)")
        # One read of the blob's tail usually holds the footer *and* the TOC: over a network that is
        # one request per layer at mount instead of two.
        tail_len = min(size, TAIL_READ_BYTES)
        tail_start = size - tail_len
        tail = self.blob.read_at(tail_start, tail_len)

        def read(offset: int, length: int) -> bytes:
            if offset >= tail_start:
                return tail[offset - tail_start: offset - tail_start + length]
            if offset + length <= tail_start:
                return self.blob.read_at(offset, length)
            # a TOC longer than the tail: fetch only the part before it
            return self.blob.read_at(offset, tail_start - offset) + tail[:offset + length - tail_start]

        reasons = []
        for kind, parse, footer_size in (
            ("gzip", c.parse_gzip_footer, c.GZIP_FOOTER_SIZE),
            ("legacy", c.parse_legacy_footer, c.LEGACY_FOOTER_SIZE),
        ):
            try:
                toc_offset = parse(tail)
            except FooterError as e:
                reasons.append(str(e))
                continue
            end = size - footer_size
            if not 0 <= toc_offset < end:
                raise FormatError(f"{self.name}: footer puts the TOC at {toc_offset}, outside the blob ({size} bytes)")
            try:
                return "gzip", toc_offset, c.read_gzip_toc(read(toc_offset, end - toc_offset))
            except FormatError as e:
                raise FormatError(f"{self.name}: {e}") from e
        try:
            toc_offset, compressed, raw = c.parse_zstd_footer(tail)
        except FooterError as e:
            reasons.append(str(e))
            raise FooterError(
                f"{self.name}: not an eStargz layer: the last bytes are no footer we know ({'; '.join(reasons)}). "
                "Is it a plain tar.gz, or truncated?"
            ) from None
        if toc_offset + compressed > size - c.ZSTD_FOOTER_SIZE - 8:
            raise FormatError(f"{self.name}: zstd footer puts the TOC outside the blob (truncated?)")
        try:
            return "zstd", toc_offset, c.read_zstd_toc(read(toc_offset, compressed), raw)
        except FormatError as e:
            raise FormatError(f"{self.name}: {e}") from e

    def _index(self) -> None:
        """Normalize the TOC as the reference's initFields does, and check what must hold for safe reads."""
        users: dict[int, str] = {}
        groups: dict[int, str] = {}
        self.chunks: dict[str, list[TOCEntry]] = {}
        self.nodes: dict[str, Node] = {}
        last_reg: TOCEntry | None = None
        payload_offsets: set[int] = set()
        for ent in self.entries:
            if ent.type not in ENTRY_TYPES:
                raise FormatError(f"{self.name}: entry {ent.name!r} has unknown type {ent.type!r}")
            if ent.type == "chunk":
                if last_reg is None:
                    raise FormatError(f"{self.name}: chunk entry {ent.name!r} follows no regular file")
                ent.path = last_reg.path
                if ent.chunk_size == 0:
                    ent.chunk_size = last_reg.size - ent.chunk_offset
                self.chunks[ent.path].append(ent)
            else:
                try:
                    ent.path = safe_name(ent.name)
                except UnsafeEntryError as e:
                    raise UnsafeEntryError(f"{self.name}: {e}") from None
                # userName/groupName are written only when they change: carry them forward per id.
                if ent.user_name:
                    users[ent.uid] = ent.user_name
                else:
                    ent.user_name = users.get(ent.uid, "")
                if ent.group_name:
                    groups[ent.gid] = ent.group_name
                else:
                    ent.group_name = groups.get(ent.gid, "")
                last_reg = None
                if ent.type == "reg":
                    last_reg = ent
                    if not 0 < ent.chunk_size < ent.size:
                        ent.chunk_size = ent.size  # not chunked (chunkSize == size is the reference's quirk)
                    self.chunks[ent.path] = [ent] if ent.size > 0 else []
            if ent.is_payload():
                if not 0 <= ent.offset < self.toc_offset:
                    raise FormatError(f"{self.name}: entry {ent.name!r} has offset {ent.offset} outside the blob")
                payload_offsets.add(ent.offset)
        # Compressed range of a payload: from its member start to the next member start (or the TOC).
        starts = sorted(payload_offsets) + [self.toc_offset]
        for path, chunks in self.chunks.items():
            expect = 0
            for ch in chunks:
                if ch.chunk_offset != expect or ch.chunk_size <= 0:
                    raise FormatError(f"{self.name}: chunks of {path!r} do not tile the file (at {ch.chunk_offset})")
                ch.compressed_end = starts[bisect.bisect_right(starts, ch.offset)]
                expect += ch.chunk_size
            if chunks and expect != chunks[0].size:
                raise FormatError(f"{self.name}: chunks of {path!r} cover {expect} of {chunks[0].size} bytes")
        self._tree()

    def _tree(self) -> None:
        root = Node("", TOCEntry(name="", type="dir", mode=0o755))
        self.nodes = {"": root}
        for ent in self.entries:
            if ent.type != "chunk":
                if ent.path == "" and ent.type == "dir":
                    root.entry = ent  # the tar's own "./" entry
                elif ent.path != "":
                    self.nodes[ent.path] = Node(ent.path, ent)
        for path in list(self.nodes):
            if path == "":
                continue
            dirname, _, basename = path.rpartition("/")  # paths are normalized: dirname/basename
            parent = self._dir(dirname)
            node = self.nodes[path]
            if node.entry.type == "hardlink":
                target = self.nodes.get(safe_name(node.entry.link_name, f"hardlink {path!r} target"))
                if target is None or target.entry.type in ("hardlink", "dir"):
                    raise FormatError(f"{self.name}: hardlink {path!r} -> {node.entry.link_name!r}: no such file")
                node.entry = target.entry
            parent.children[basename] = node
        # nlink: names per file; 2 + subdirectories per directory.
        by_entry: dict[int, int] = {}
        for node in self.nodes.values():
            by_entry[id(node.entry)] = by_entry.get(id(node.entry), 0) + 1
        for node in self.nodes.values():
            if node.entry.type == "dir":
                node.nlink = 2 + sum(1 for ch in node.children.values() if ch.entry.type == "dir")
            else:
                node.nlink = by_entry[id(node.entry)]

    def _dir(self, path: str) -> Node:
        node = self.nodes.get(path)
        if node is None:  # an implicit parent: the reference makes it 0755 root:root
            node = self.nodes[path] = Node(path, TOCEntry(name=path + "/", type="dir", mode=0o755, path=path))
            dirname, _, basename = path.rpartition("/")
            self._dir(dirname).children[basename] = node
        elif node.entry.type == "symlink":
            # Go would hang children on the symlink; followed on disk they would land wherever it points.
            raise UnsafeEntryError(f"{self.name}: entries lie under the symlink {path!r} -> {node.entry.link_name!r}")
        elif node.entry.type != "dir":
            raise FormatError(f"{self.name}: {path!r} is a {node.entry.type} but has children")
        return node

    # --- lookup ------------------------------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        return self.nodes.get(safe_name(path))

    def walk(self, node: Node | None = None) -> Iterator[Node]:
        """Every node below `node` (default: the root), depth first, children by name."""
        node = node or self.nodes[""]
        for name in sorted(node.children):
            child = node.children[name]
            yield child
            if child.entry.type == "dir":
                yield from self.walk(child)

    # --- payloads ----------------------------------------------------------------------------------

    def chunk_for(self, path: str, offset: int) -> TOCEntry:
        """The chunk entry holding byte `offset` of the file at `path`."""
        chunks = self.chunks.get(safe_name(path)) or []
        i = bisect.bisect_right([ch.chunk_offset for ch in chunks], offset) - 1
        if i < 0 or offset >= chunks[i].chunk_offset + chunks[i].chunk_size:
            raise KeyError(f"{self.name}: {path!r} has no byte {offset}")
        return chunks[i]

    def compressed_range(self, chunk: TOCEntry) -> tuple[int, int]:
        """[start, end) of the compressed bytes that hold `chunk`: what a Range request must fetch."""
        return chunk.offset, chunk.compressed_end

    def decode_chunk(self, chunk: TOCEntry, compressed: bytes) -> bytes:
        """Inflate and verify a chunk from its compressed range; raise rather than return bad bytes."""
        want = chunk.inner_offset + chunk.chunk_size
        try:
            data = c.decompress_member(self.kind, compressed, want)[chunk.inner_offset :]
        except FormatError as e:
            raise ChunkDigestMismatch(f"{self.name}: {chunk.path!r} at {chunk.chunk_offset}: {e}") from e
        expected = chunk.chunk_digest or (chunk.digest if chunk.type == "reg" and chunk.chunk_size == chunk.size else "")
        if not expected:
            raise ChunkDigestMismatch(f"{self.name}: {chunk.path!r} at {chunk.chunk_offset} has no digest to verify")
        if len(data) != chunk.chunk_size or "sha256:" + hashlib.sha256(data).hexdigest() != expected:
            raise ChunkDigestMismatch(
                f"{self.name}: {chunk.path!r} chunk at {chunk.chunk_offset} does not match its digest (corrupt blob)"
            )
        return data

    def read_chunk(self, chunk: TOCEntry) -> bytes:
        start, end = self.compressed_range(chunk)
        return self.decode_chunk(chunk, self.blob.read_at(start, end - start))

    def iter_file(self, path: str) -> Iterator[bytes]:
        """The verified content of a regular file, chunk by chunk; the whole-file digest is checked at the end."""
        node = self.lookup(path)
        if node is None or node.entry.type != "reg":
            raise KeyError(f"{self.name}: {path!r} is not a regular file")
        whole = hashlib.sha256()
        for chunk in self.chunks[node.entry.path]:
            data = self.read_chunk(chunk)
            whole.update(data)
            yield data
        if node.entry.digest and "sha256:" + whole.hexdigest() != node.entry.digest:
            raise ChunkDigestMismatch(f"{self.name}: {path!r} does not match its file digest (corrupt blob)")

    def read_file(self, path: str) -> bytes:
        return b"".join(self.iter_file(path))

    # --- verification ------------------------------------------------------------------------------

    def verify_toc(self, toc_digest: str) -> None:
        if toc_digest != self.toc_digest:
            raise TOCDigestMismatch(f"{self.name}: TOC digest is {self.toc_digest}, expected {toc_digest}")

    def verify(self, toc_digest: str | None = None, workers: int | None = None) -> int:
        """Check the TOC digest (when given) and every chunk and file digest. Returns the files checked."""
        if toc_digest:
            self.verify_toc(toc_digest)
        from concurrent.futures import ThreadPoolExecutor

        files = [chunks[0].path for chunks in self.chunks.values() if chunks]

        def check(path: str) -> None:
            for _ in self.iter_file(path):
                pass

        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for f in [pool.submit(check, p) for p in files]:
                f.result()
        return len(files)
