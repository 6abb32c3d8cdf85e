"""One image layer served lazily: its TOC from the registry, chunks fetched on first read, verified, cached.

A read maps (file, offset) to chunks, serves the cached ones, and fetches the missing ones in one
request (multi-range where the registry allows), decoding and verifying each before it is cached or
returned. Layers that are not eStargz are downloaded once, converted locally and then served the
same way.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

from lazybuild import estargz
from lazybuild.digest import InvalidDigest, check_digest, digest_hex
from lazybuild.estargz import LayerReader, TOCEntry
from lazybuild.image import Descriptor
from lazybuild.registry import Registry

from .cache import ChunkCache

log = logging.getLogger("lazybuild.mount")
MERGE_GAP_BYTES = 64 << 10  # misses closer than this are fetched as one range


class LayerError(Exception):
    pass


class NotEStargz(LayerError):
    pass


@dataclass
class LayerStats:
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


class _RemoteBlob:
    """The estargz Blob protocol over registry Range requests, counting what it fetches."""

    def __init__(self, registry: Registry, repository: str, desc: Descriptor, stats: LayerStats):
        self.registry, self.repository, self.digest, self.size, self.stats = registry, repository, desc.digest, desc.size, stats

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        parts = self.registry.read_ranges(self.repository, self.digest, ranges)
        self.stats.fetched_bytes += sum(len(p) for p in parts)
        return parts

    def read_at(self, offset: int, length: int) -> bytes:
        return self.read_many([(offset, offset + length)])[0]


class _KeptReads:
    """A blob whose reads (the footer and TOC at open) are kept as files in a directory, one per
    (offset, length), written under a temporary name and renamed; later opens replay them."""

    def __init__(self, blob: _RemoteBlob, directory: str, tail: bytes = b""):
        self.blob, self.dir, self.size = blob, directory, blob.size
        self.tail = tail  # the blob's last bytes, when the caller already has them

    def read_at(self, offset: int, length: int) -> bytes:
        path = os.path.join(self.dir, f"{offset}-{length}")
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) == length:
                return data
        except FileNotFoundError:
            pass
        if self.tail and offset >= self.size - len(self.tail) and offset + length <= self.size:
            start = offset - (self.size - len(self.tail))
            data = self.tail[start:start + length]
        else:
            data = self.blob.read_at(offset, length)
        # Keeping is an optimisation (a restart without the registry): a full or read-only disk only
        # costs the next open a fetch. What is kept is checked against the TOC digest when replayed.
        tmp = None
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            log.warning("cannot keep the TOC read %s of %s (%s); it is fetched again at the next open",
                        os.path.basename(path), self.blob.digest, e.strerror or e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return data


@dataclass
class FetchedLayer:
    """A layer whose footer and TOC are read but not parsed yet."""
    index: int
    name: str
    blob: _RemoteBlob
    reads: object  # the blob the TOC reads went through (_KeptReads or the blob)
    toc: tuple[str, int, bytes]  # (kind, TOC offset, raw TOC JSON)
    stats: LayerStats

    @property
    def toc_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.toc[2]).hexdigest()

    def verify_toc(self, expected: str) -> None:
        if self.toc_digest != expected:
            raise estargz.TOCDigestMismatch(f"{self.name}: TOC digest is {self.toc_digest}, expected {expected}")


@dataclass
class LazyLayer:
    index: int
    reader: LayerReader
    cache: ChunkCache
    stats: LayerStats
    remote: "_RemoteBlob | None" = None
    _locks: dict = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    last_read: float = 0.0
    _by_offset: tuple | None = None  # payload chunks sorted by offset, and their offsets (for bisect)
    read_around: int = 0  # > 0: a miss also brings the uncached chunks of its aligned window of this size

    def __post_init__(self) -> None:
        # Every chunk key becomes a cache file name and a lock: a TOC written by a stranger could say
        # `sha256:../../etc/shadow`. The layer is refused here, whole, rather than at some later read
        # (a FormatError: `lazybuild mount` prints it; the snapshotter reports the layer unavailable, EIO).
        for chunks in self.reader.chunks.values():
            for c in chunks:
                key = self.key(c)
                what = f"{self.reader.name}: {c.path!r} chunk at {c.chunk_offset}"
                if not key:
                    raise estargz.FormatError(f"{what} has no chunkDigest to verify it by; the layer cannot be "
                                              "served (convert the image with `lazybuild convert`)")
                try:
                    check_digest(key, f"{what}: chunkDigest")
                except InvalidDigest as e:
                    raise estargz.FormatError(f"{e}; the TOC is malformed or hostile, the layer is not mounted") \
                        from None

    @classmethod
    def open(cls, index: int, registry: Registry, repository: str, desc: Descriptor, cache: ChunkCache,
             workdir: str, verify: bool = True, toc_dir: str | None = None, whole: bool = True) -> "LazyLayer":
        """With `toc_dir`, the footer and TOC reads are kept there and replayed on the next open (no
        network needed to serve what the chunk cache holds). Without `whole`, a layer that is not
        eStargz raises NotEStargz instead of being downloaded."""
        try:
            fetched = cls.fetch(index, registry, repository, desc, toc_dir)
        except NotEStargz:
            if not whole:
                raise
            return cls._fetch_whole(index, registry, repository, desc, cache, workdir, LayerStats(desc.digest, desc.size))
        toc_digest = desc.annotations.get(estargz.TOC_DIGEST_ANNOTATION)
        if toc_digest:
            fetched.verify_toc(toc_digest)
        elif verify:
            raise LayerError(f"layer {index} ({desc.digest}) has no {estargz.TOC_DIGEST_ANNOTATION} annotation, so its "
                             "TOC cannot be verified; convert the image with `lazybuild convert` or mount with "
                             "--insecure-skip-verify")
        return cls.build(fetched, cache)

    @classmethod
    def fetch(cls, index: int, registry: Registry, repository: str, desc: Descriptor,
              toc_dir: str | None = None, tail: bytes = b"") -> "FetchedLayer":
        """The network half of opening: footer and TOC read (raises NotEStargz for other layers).
        `tail`: the blob's last bytes if the caller fetched them already (with toc_dir only)."""
        stats = LayerStats(desc.digest, desc.size)
        stats.fetched_bytes += len(tail)
        blob = _RemoteBlob(registry, repository, desc, stats)
        reads = _KeptReads(blob, toc_dir, tail) if toc_dir else blob
        name = f"layer {index} ({desc.digest})"
        try:
            toc = LayerReader.fetch_toc(reads, name)
        except estargz.FooterError as e:
            raise NotEStargz(str(e)) from None
        return FetchedLayer(index, name, blob, reads, toc, stats)

    @classmethod
    def build(cls, fetched: "FetchedLayer", cache: ChunkCache) -> "LazyLayer":
        """The CPU half: parse and index the TOC."""
        reader = LayerReader(fetched.reads, name=fetched.name, toc=fetched.toc)
        return cls(fetched.index, reader, cache, fetched.stats, fetched.blob)

    @classmethod
    def _fetch_whole(cls, index, registry, repository, desc, cache, workdir, stats) -> "LazyLayer":
        """Not eStargz: download once, convert locally (kept beside the cache, by layer digest), serve from it."""
        stats.lazy = False
        local = os.path.join(workdir, "layers", digest_hex(desc.digest) + ".esgz")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if not os.path.exists(local):
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(local), prefix=".download-") as tmp:
                registry.fetch_blob(repository, desc.digest, tmp, size=desc.size)
                stats.fetched_bytes += desc.size
                tmp.flush()
                estargz.convert_file(tmp.name, local)
        return cls(index, LayerReader.open_file(local), cache, stats, None)

    # --- reads ---------------------------------------------------------------------------------------------

    @staticmethod
    def key(chunk: TOCEntry) -> str:
        """The digest the chunk is verified by (as LayerReader.decode_chunk picks it), hence its cache key:
        a file's whole digest only when the file is one chunk, "" when there is nothing to verify."""
        if chunk.chunk_digest:
            return chunk.chunk_digest
        if chunk.type == "reg" and chunk.chunk_size == chunk.size:
            return chunk.digest
        return ""

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _locks_for(self, chunks: list[TOCEntry]) -> list[threading.Lock]:
        """One lock per distinct chunk digest (identical files share one: taking it twice would hang),
        in digest order, so two loads of overlapping chunk sets never wait on each other in a cycle."""
        return [self._lock_for(k) for k in sorted({self.key(c) for c in chunks})]

    def lock_chunks(self, chunks: list[TOCEntry]) -> None:
        """Take the locks of `chunks` (for prefetch(locked=True), which releases each one): all of them,
        or none if taking them fails."""
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

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the regular file `path` of this layer, every one verified."""
        self.last_read = time.monotonic()
        chunks = self.reader.chunks.get(path) or []
        wanted = [c for c in chunks if c.chunk_offset < offset + size and c.chunk_offset + c.chunk_size > offset]
        data = self.load(wanted)
        out = b"".join(data[id(c)] for c in wanted)
        start = offset - (wanted[0].chunk_offset if wanted else 0)
        return out[start:start + size]

    def read_if_in_memory(self, path: str, offset: int, size: int) -> bytes | None:
        """The same bytes as read(), but only when every chunk is in the memory LRU (no I/O, no waiting)."""
        chunks = self.reader.chunks.get(path) or []
        wanted = [c for c in chunks if c.chunk_offset < offset + size and c.chunk_offset + c.chunk_size > offset]
        parts = []
        for c in wanted:
            hit = self.cache.memory_get(self.key(c))
            if hit is None:
                return None
            parts.append(hit)
        self.last_read = time.monotonic()
        self.stats.served_from_cache += size
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - (wanted[0].chunk_offset if wanted else 0)
        return out[start:start + size]

    def load(self, chunks: list[TOCEntry]) -> dict[int, bytes]:
        """The verified bytes of each chunk, from the cache or fetched together in one request."""
        out: dict[int, bytes] = {}
        missing = []
        for c in chunks:
            hit = self.cache.get(self.key(c))
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
                hit = self.cache.get(self.key(c))
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
            return {id(c): self._store(c, self.reader.read_chunk(c)) for c in chunks}
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
                    self._store(c, data)
                    if id(c) in wanted:
                        out[id(c)] = data
                    break
        return out

    def _read_around(self, chunks: list[TOCEntry]) -> list[TOCEntry]:
        """The uncached chunks that lie whole inside the `read_around`-aligned windows of the missing
        ones: the files next to a file read are usually read next (a package's modules, a compiler's
        parts), and bringing them in the same request saves a round trip each."""
        by_offset, offsets = self._chunk_index()
        keys = {self.key(c) for c in chunks}
        extra = []
        for c in chunks:
            a, b = self.reader.compressed_range(c)
            lo = a // self.read_around * self.read_around
            hi = -(-b // self.read_around) * self.read_around
            for n in by_offset[bisect.bisect_left(offsets, lo):bisect.bisect_left(offsets, hi)]:
                k = self.key(n)
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

    def _store(self, chunk: TOCEntry, data: bytes) -> bytes:
        """Cache a verified chunk and return it: served even when the disk cannot keep it (put never
        raises for the disk)."""
        self.cache.put(self.key(chunk), data)
        return data

    # --- prefetch and background fetch -------------------------------------------------------------------------

    def payload_chunks(self) -> list[TOCEntry]:
        return sorted((c for cs in self.reader.chunks.values() for c in cs), key=lambda c: c.offset)

    def prefetch_chunks(self) -> list[TOCEntry]:
        """The uncached chunks of [0, .prefetch.landmark): what the workload reads first."""
        node = self.reader.lookup(estargz.PREFETCH_LANDMARK)
        if node is None or self.remote is None:
            return []
        end = node.entry.offset
        out, seen = [], set()
        for c in self.payload_chunks():  # a digest twice (identical files) is fetched and locked once
            if c.compressed_end <= end and self.key(c) not in seen and not self.cache.has(self.key(c)):
                seen.add(self.key(c))
                out.append(c)
        return out

    def prefetch(self, chunks: list[TOCEntry] | None = None, locked: bool = False) -> int:
        """Stream [0, .prefetch.landmark) in one request, caching each chunk the moment its bytes are in.

        With `locked`, the caller already holds the chunks' locks (taken before the mount serves, so a
        read of a prefetched file waits for the stream to pass it instead of fetching it again); each
        lock is released as its chunk is stored. Returns the bytes prefetched."""
        chunks = self.prefetch_chunks() if chunks is None else chunks
        if not chunks:
            return 0
        unique = {}
        for c in chunks:
            unique.setdefault(self.key(c), c)
        chunks = sorted(unique.values(), key=lambda c: c.offset)
        if not locked:
            self.lock_chunks(chunks)
        pending = [(c, self._lock_for(self.key(c))) for c in chunks]
        end = max(c.compressed_end for c in chunks)
        buf = bytearray()
        try:
            for data in self.remote.registry.stream_range(self.remote.repository, self.remote.digest, 0, end):
                buf += data
                self.stats.fetched_bytes += len(data)
                self.stats.prefetched_bytes += len(data)
                while pending and pending[0][0].compressed_end <= len(buf):
                    chunk, lk = pending.pop(0)
                    a, b = self.reader.compressed_range(chunk)
                    try:
                        self._store(chunk, self.reader.decode_chunk(chunk, bytes(buf[a:b])))
                    except estargz.EStargzError as e:
                        log.error("prefetch of layer %d: %s", self.index, e)  # its reader will fetch and fail alone
                    finally:  # released whatever storing did: readers of this chunk wait on it
                        lk.release()
        except Exception as e:  # the mount still serves: readers fetch what the prefetch did not bring
            log.warning("prefetch of layer %d stopped: %s", self.index, e)
        finally:
            for _, lk in pending:
                lk.release()
        return end

    def background_fetch(self, stop: threading.Event, idle_s: float = 0.5, batch_bytes: int = 4 << 20) -> None:
        """Fetch the rest of the layer while nothing else reads (reads always go first)."""
        if self.remote is None:
            return
        batch: list[TOCEntry] = []
        size = 0
        for c in self.payload_chunks():
            if stop.is_set():
                return
            if self.cache.has(self.key(c)):
                continue
            batch.append(c)
            size += c.compressed_end - c.offset
            if size >= batch_bytes:
                self._background_batch(batch, stop, idle_s)
                batch, size = [], 0
        if batch:
            self._background_batch(batch, stop, idle_s)

    def _background_batch(self, batch, stop, idle_s) -> None:
        while not stop.is_set() and time.monotonic() - self.last_read < idle_s:
            time.sleep(idle_s)
        if stop.is_set():
            return
        try:
            self.load(batch)
        except Exception as e:  # background work never takes the mount down; reads retry on their own
            log.warning("background fetch of layer %d: %s", self.index, e)
