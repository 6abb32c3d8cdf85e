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
from .errors import (ChunkDigestMismatch, FooterError, FormatError, LimitExceeded, TOCDigestMismatch,
                     UnsafeEntryError)
from .toc import ENTRY_TYPES, TOCEntry, parse_toc_json, safe_name


TAIL_READ_BYTES = 256 << 10

# A chunk is inflated whole into memory before its digest is checked, so its size is capped. Writers
# (ours, stargz-snapshotter's, CRFS) chunk at 4 MiB by default; 1 GiB leaves room for any --chunk-size
# in use while a hostile entry cannot make one read ask for terabytes.
MAX_CHUNK_SIZE = 1 << 30


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
        self.kind, self.toc_offset, raw_toc = toc if toc is not None else self._read_toc()
        # The raw TOC is not kept: parsed, it is a few MB a big layer would hold for nothing.
        self.toc_digest = "sha256:" + hashlib.sha256(raw_toc).hexdigest()
        self.entries = self._named(parse_toc_json, raw_toc)
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
        """Find the footer, check that the TOC range it gives lies inside the blob and under the caps,
        and only then read and inflate the TOC (bounded by the caps too)."""
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
            end = size - footer_size  # the TOC member runs from its offset to the footer
            if not 0 <= toc_offset < end:
                raise FormatError(f"{self.name}: the {kind} footer puts the TOC at {toc_offset}, outside the blob "
                                  f"({size} bytes, footer at {end}); the blob is truncated or not what its footer says")
            self._check_toc_cap(end - toc_offset, f"{footer_size}-byte footer")
            return "gzip", toc_offset, self._named(c.read_gzip_toc, read(toc_offset, end - toc_offset))
        try:
            toc_offset, compressed, raw = c.parse_zstd_footer(tail)
        except FooterError as e:
            reasons.append(str(e))
            raise FooterError(
                f"{self.name}: not an eStargz layer: the last bytes are no footer we know ({'; '.join(reasons)}). "
                "Is it a plain tar.gz, or truncated?"
            ) from None
        # The TOC sits in a skippable frame (8-byte header) right before the footer's own frame.
        end = size - c.ZSTD_FOOTER_SIZE - 8
        if toc_offset < 8 or compressed == 0 or toc_offset + compressed > end:
            raise FormatError(f"{self.name}: the zstd footer puts the TOC at {toc_offset}+{compressed}, outside the "
                              f"blob ({size} bytes, footer frame at {end}); the blob is truncated or not what its footer says")
        self._check_toc_cap(compressed, "zstd footer")
        if raw > c.MAX_TOC_SIZE:
            raise LimitExceeded(f"{self.name}: the zstd footer gives a TOC of {c._mib(raw)} uncompressed, more than the "
                                f"{c._mib(c.MAX_TOC_SIZE)} cap on a TOC (estargz.compression.MAX_TOC_SIZE); "
                                "split the layer if it really has that many files")
        return "zstd", toc_offset, self._named(c.read_zstd_toc, read(toc_offset, compressed), raw)

    def _check_toc_cap(self, compressed: int, where: str) -> None:
        if compressed > c.MAX_TOC_COMPRESSED_SIZE:
            raise LimitExceeded(
                f"{self.name}: the {where} gives a compressed TOC of {c._mib(compressed)}, more than the "
                f"{c._mib(c.MAX_TOC_COMPRESSED_SIZE)} cap (estargz.compression.MAX_TOC_COMPRESSED_SIZE); "
                "not read. A real TOC this large is unlikely: is the footer right?")

    def _named(self, fn, *args):
        """fn(*args), with the layer's name put in front of any format error (keeping its class)."""
        try:
            return fn(*args)
        except FormatError as e:
            raise type(e)(f"{self.name}: {e}") from e

    def _index(self) -> None:
        """Normalize the TOC as the reference's initFields does, and check what must hold for safe reads:
        payloads inside the blob, chunks that tile their file exactly, no chunk past MAX_CHUNK_SIZE."""
        users: dict[int, str] = {}
        groups: dict[int, str] = {}
        self.chunks: dict[str, list[TOCEntry]] = {}
        self.nodes: dict[str, Node] = {}
        files: dict[str, TOCEntry] = {}  # path -> the reg entry whose size its chunks must tile
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
                if "\0" in ent.name or "\0" in ent.link_name:  # no file system takes it; os.* would raise ValueError
                    raise FormatError(f"{self.name}: entry {ent.name!r} has a NUL byte in its name or link target")
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
                    last_reg = files[ent.path] = ent
                    if not 0 < ent.chunk_size < ent.size:
                        ent.chunk_size = ent.size  # not chunked (chunkSize == size is the reference's quirk)
                    self.chunks[ent.path] = [ent] if ent.size > 0 else []
            if ent.is_payload():
                if not 0 <= ent.offset < self.toc_offset:
                    raise FormatError(f"{self.name}: entry {ent.name!r} has offset {ent.offset}, outside the payload "
                                      f"part of the blob (the TOC starts at {self.toc_offset})")
                payload_offsets.add(ent.offset)
        # Compressed range of a payload: from its member start to the next member start (or the TOC).
        starts = sorted(payload_offsets) + [self.toc_offset]
        for path, chunks in self.chunks.items():
            expect, size = 0, files[path].size
            for ch in chunks:
                if ch.chunk_offset != expect or not 0 < ch.chunk_size <= size - expect:
                    raise FormatError(f"{self.name}: chunks of {path!r} do not tile the file: chunk at "
                                      f"{ch.chunk_offset} (size {ch.chunk_size}) after {expect} of {size} bytes")
                # A chunk is inflated whole into memory before its digest can be checked.
                if ch.chunk_size > MAX_CHUNK_SIZE or ch.inner_offset > MAX_CHUNK_SIZE:
                    raise LimitExceeded(
                        f"{self.name}: {path!r} has a chunk of {ch.chunk_size} bytes at inner offset {ch.inner_offset}, "
                        f"past the {MAX_CHUNK_SIZE >> 20} MiB cap on one chunk (estargz.reader.MAX_CHUNK_SIZE); "
                        "rebuild the layer with a smaller --chunk-size")
                ch.compressed_end = starts[bisect.bisect_right(starts, ch.offset)]
                expect += ch.chunk_size
            if expect != size:
                raise FormatError(f"{self.name}: chunks of {path!r} cover {expect} of {size} bytes")
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
                try:
                    target = self.nodes.get(safe_name(node.entry.link_name, f"hardlink {path!r} target"))
                except UnsafeEntryError as e:
                    raise UnsafeEntryError(f"{self.name}: {e}") from None
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
        """The directory node at `path`, made (with its missing parents) when the TOC has no entry for it.
        A loop, not recursion: a hostile name may be thousands of levels deep."""
        missing = []
        node = self.nodes.get(path)
        while node is None:  # climb to the nearest existing ancestor ("" always exists)
            missing.append(path)
            path = path.rpartition("/")[0]
            node = self.nodes.get(path)
        self._check_dir(node)
        for path in reversed(missing):  # an implicit parent: the reference makes it 0755 root:root
            child = self.nodes[path] = Node(path, TOCEntry(name=path + "/", type="dir", mode=0o755, path=path))
            node.children[path.rpartition("/")[2]] = child
            node = child
        return node

    def _check_dir(self, node: Node) -> None:
        if node.entry.type == "symlink":
            # Go would hang children on the symlink; followed on disk they would land wherever it points.
            raise UnsafeEntryError(f"{self.name}: entries lie under the symlink {node.path!r} -> {node.entry.link_name!r}")
        if node.entry.type != "dir":
            raise FormatError(f"{self.name}: {node.path!r} is a {node.entry.type} but has children")

    # --- lookup ------------------------------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        return self.nodes.get(safe_name(path))

    def walk(self, node: Node | None = None) -> Iterator[Node]:
        """Every node below `node` (default: the root), depth first, children by name."""
        # An explicit stack, not recursion: a hostile layer may nest directories thousands deep.
        stack = [iter(sorted((node or self.nodes[""]).children.items()))]
        while stack:
            for _, child in stack[-1]:
                yield child
                if child.entry.type == "dir":
                    stack.append(iter(sorted(child.children.items())))
                break
            else:
                stack.pop()

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
        try:
            # Inflates at most inner_offset + chunk_size bytes, however much the member holds.
            data = c.decompress_member(self.kind, compressed, chunk.chunk_size, skip=chunk.inner_offset)
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
