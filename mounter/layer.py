"""One image layer's TOC and its verified reads: (file, offset) -> chunks -> cached or fetched bytes.

A read maps its range onto the file's chunks, serves the cached ones, and fetches the missing ones
in one request (neighbours merged, multi-range where the registry allows), decoding and verifying
each against its chunkDigest before it is cached or returned. Concurrent readers of one chunk
fetch it once: each chunk digest has a lock, which prefetch.py also takes.

Where the bytes come from is fetch.py's business (a registry blob, or a whole layer converted
locally); what to fetch before anyone asks is prefetch.py's.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lazybuild import estargz
from lazybuild.digest import InvalidDigest, check_digest
from lazybuild.errors import MountError
from lazybuild.estargz import LayerReader, TOCEntry

from .cache import ChunkCache

if TYPE_CHECKING:
    from .fetch import RemoteBlob

log = logging.getLogger("lazybuild.mount")
MERGE_GAP_BYTES = 64 << 10  # misses closer than this are fetched as one range


class LayerError(MountError):
    """A layer that cannot be opened or served (the message says which and why)."""


class NotEStargz(LayerError):
    """The blob has no eStargz footer: it can only be downloaded whole."""


@dataclass
class LayerStats:
    """What one layer cost and served, as `lazybuild mount --status` and the snapshotter report it."""
    digest: str
    size: int
    fetched_bytes: int = 0  # compressed bytes that crossed the network
    served_from_cache: int = 0
    prefetched_bytes: int = 0
    lazy: bool = True

    def to_json(self) -> dict:
        return {"digest": self.digest, "size": self.size, "fetchedBytes": self.fetched_bytes,
                "fetchedPercent": round(100 * self.fetched_bytes / self.size, 2) if self.size else 0,
                "servedFromCache": self.served_from_cache, "prefetchedBytes": self.prefetched_bytes, "lazy": self.lazy}


@dataclass
class LazyLayer:
    index: int
    reader: LayerReader
    cache: ChunkCache
    stats: LayerStats
    remote: "RemoteBlob | None" = None  # None: a layer converted locally, read from its file
    _locks: dict = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    last_read: float = 0.0  # time.monotonic() of the last read: the background fetch waits for quiet
    _by_offset: tuple | None = None  # payload chunks sorted by offset, and their offsets (for bisect)
    read_around: int = 0  # > 0: a miss also brings the uncached chunks of its aligned window of this size

    def __post_init__(self) -> None:
        # Every chunk key becomes a cache file name and a lock: a TOC written by a stranger could say
        # `sha256:../../etc/shadow`. The layer is refused here, whole, rather than at some later read
        # (a FormatError: `lazybuild mount` prints it; the snapshotter reports the layer unavailable, EIO).
        for chunks in self.reader.chunks.values():
            for c in chunks:
                key = self.cache_key(c)
                what = f"{self.reader.name}: {c.path!r} chunk at {c.chunk_offset}"
                if not key:
                    raise estargz.FormatError(f"{what} has no chunkDigest to verify it by; the layer cannot be "
                                              "served (convert the image with `lazybuild convert`)")
                try:
                    check_digest(key, f"{what}: chunkDigest")
                except InvalidDigest as e:
                    raise estargz.FormatError(f"{e}; the TOC is malformed or hostile, the layer is not mounted") \
                        from None

    # --- what the layer holds ----------------------------------------------------------------------------------

    @staticmethod
    def cache_key(chunk: TOCEntry) -> str:
        """The digest the chunk is verified by (as LayerReader.decode_chunk picks it), hence its cache key:
        a file's whole digest only when the file is one chunk, "" when there is nothing to verify."""
        if chunk.chunk_digest:
            return chunk.chunk_digest
        if chunk.type == "reg" and chunk.chunk_size == chunk.size:
            return chunk.digest
        return ""

    def payload_chunks(self) -> list[TOCEntry]:
        """Every chunk of every regular file, in blob order."""
        return sorted((c for cs in self.reader.chunks.values() for c in cs), key=lambda c: c.offset)

    def chunk_keys(self) -> set[str]:
        """The cache keys of all its chunks (what removing the layer may free)."""
        return {self.cache_key(c) for c in self.payload_chunks()}

    @property
    def has_prefetch_landmark(self) -> bool:
        """An optimized layer: its first files are what its workload reads, up to `.prefetch.landmark`."""
        return self.reader.lookup(estargz.PREFETCH_LANDMARK) is not None

    def unpacked_usage(self) -> tuple[int, int]:
        """(bytes, inodes) of its files as if unpacked."""
        entries = [e for e in self.reader.entries if e.type != "chunk"]
        return sum(e.size for e in entries if e.type == "reg"), len(entries)

    # --- chunk locks -------------------------------------------------------------------------------------------

    def chunk_lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _locks_for(self, chunks: list[TOCEntry]) -> list[threading.Lock]:
        """One lock per distinct chunk digest (identical files share one: taking it twice would hang),
        in digest order, so two loads of overlapping chunk sets never wait on each other in a cycle."""
        return [self.chunk_lock(k) for k in sorted({self.cache_key(c) for c in chunks})]

    def lock_chunks(self, chunks: list[TOCEntry]) -> None:
        """Take the locks of `chunks` (a Prefetch holds them until it streams): all of them, or none if
        taking them fails."""
        held = []
        try:
            for lk in self._locks_for(chunks):
                lk.acquire()
                held.append(lk)
        except BaseException:
            for lk in held:
                lk.release()
            raise

    def unlock_chunks(self, chunks: list[TOCEntry]) -> None:
        for lk in self._locks_for(chunks):
            lk.release()

    # --- reads -------------------------------------------------------------------------------------------------

    def _chunks_of(self, path: str, offset: int, size: int) -> list[TOCEntry]:
        chunks = self.reader.chunks.get(path) or []
        return [c for c in chunks if c.chunk_offset < offset + size and c.chunk_offset + c.chunk_size > offset]

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the regular file `path` of this layer, every one verified."""
        self.last_read = time.monotonic()
        wanted = self._chunks_of(path, offset, size)
        data = self.load(wanted)
        out = b"".join(data[id(c)] for c in wanted)
        start = offset - (wanted[0].chunk_offset if wanted else 0)
        return out[start:start + size]

    def read_if_in_memory(self, path: str, offset: int, size: int) -> bytes | None:
        """The same bytes as read(), but only when every chunk is in the memory LRU (no I/O, no waiting)."""
        wanted = self._chunks_of(path, offset, size)
        parts = []
        for c in wanted:
            hit = self.cache.memory_get(self.cache_key(c))
            if hit is None:
                return None
            parts.append(hit)
        self.last_read = time.monotonic()
        self.stats.served_from_cache += size
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - (wanted[0].chunk_offset if wanted else 0)
        return out[start:start + size]

    def load(self, chunks: list[TOCEntry]) -> dict[int, bytes]:
        """The verified bytes of each chunk (by id()), from the cache or fetched together in one request."""
        out: dict[int, bytes] = {}
        missing = []
        for c in chunks:
            hit = self.cache.get(self.cache_key(c))
            if hit is not None:
                out[id(c)] = hit
                self.stats.served_from_cache += len(hit)
            else:
                missing.append(c)
        if not missing:
            return out
        held = []
        try:
            for lk in self._locks_for(missing):  # concurrent readers of one chunk fetch it once
                lk.acquire()
                held.append(lk)
            still = []
            for c in missing:
                hit = self.cache.get(self.cache_key(c))
                if hit is not None:
                    out[id(c)] = hit
                else:
                    still.append(c)
            if still:
                out.update(self._fetch(still))
        finally:  # every lock taken is given back, whatever failed: a held lock hangs every later reader
            for lk in held:
                lk.release()
        return out

    def _fetch(self, chunks: list[TOCEntry]) -> dict[int, bytes]:
        if self.remote is None:  # a layer converted locally: its reader reads the local file
            return {id(c): self.store(c, self.reader.read_chunk(c)) for c in chunks}
        wanted = {id(c) for c in chunks}
        every = chunks + (self._read_around(chunks) if self.read_around else [])
        spans = sorted({self.reader.compressed_range(c) for c in every})
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a - merged[-1][1] <= MERGE_GAP_BYTES:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        started = time.monotonic()
        parts = self.remote.read_many([(a, b) for a, b in merged])
        log.debug("layer %d: %d chunks (%d read around) in %d ranges, %d bytes, %.1f ms", self.index, len(every),
                  len(every) - len(chunks), len(merged), sum(len(p) for p in parts), (time.monotonic() - started) * 1000)
        out = {}
        for c in every:
            a, b = self.reader.compressed_range(c)
            for (ma, mb), part in zip(merged, parts):
                if ma <= a and b <= mb:
                    try:
                        data = self.reader.decode_chunk(c, part[a - ma:b - ma])
                    except estargz.EStargzError as e:
                        if id(c) in wanted:
                            raise
                        log.warning("layer %d: a chunk read around a miss failed verification: %s", self.index, e)
                        break  # never cached; a read of it fetches it again
                    self.store(c, data)
                    if id(c) in wanted:
                        out[id(c)] = data
                    break
        return out

    def _read_around(self, chunks: list[TOCEntry]) -> list[TOCEntry]:
        """The uncached chunks that lie whole inside the `read_around`-aligned windows of the missing
        ones: the files next to a file read are usually read next (a package's modules, a compiler's
        parts), and bringing them in the same request saves a round trip each."""
        by_offset, offsets = self._chunk_index()
        keys = {self.cache_key(c) for c in chunks}
        extra = []
        for c in chunks:
            a, b = self.reader.compressed_range(c)
            lo = a // self.read_around * self.read_around
            hi = -(-b // self.read_around) * self.read_around
            for n in by_offset[bisect.bisect_left(offsets, lo):bisect.bisect_left(offsets, hi)]:
                k = self.cache_key(n)
                if k in keys or n.compressed_end > hi or self.cache.has(k):
                    continue
                keys.add(k)
                extra.append(n)
        return extra

    def _chunk_index(self) -> tuple[list[TOCEntry], list[int]]:
        if self._by_offset is None:
            chunks = self.payload_chunks()
            self._by_offset = (chunks, [c.offset for c in chunks])
        return self._by_offset

    def store(self, chunk: TOCEntry, data: bytes) -> bytes:
        """Cache a verified chunk and return it: served even when the disk cannot keep it (put never
        raises for the disk)."""
        self.cache.put(self.cache_key(chunk), data)
        return data
