"""One image layer's TOC and its verified reads: (file, offset) -> chunks -> cached or fetched bytes.

A read maps its range onto the file's chunks and serves the cached ones. The missing ones go through
the layer's one read engine (mount, build and the snapshotter all read this way):

- a miss brings its window: the uncached chunks lying whole inside the `read_around`-aligned region
  of the blob around it (stargz-snapshotter fetches aligned regions too), never more than that
  region, in as few ranges as the gaps allow (plan_window, merge_spans);
- one fetch per chunk: each chunk digest has a lock (prefetch.py takes them too); a reader of a chunk
  being fetched waits for that fetch and takes its result from the cache; neighbours whose lock is
  taken are left to whoever holds it;
- misses that arrive together go out together: up to MAX_FETCHES_IN_FLIGHT requests per layer are
  in flight, and the misses that arrive meanwhile are sent as one request when one returns
  (FetchQueue), so many concurrent small reads do not cost a round trip each;
- every chunk is decoded and verified against its chunkDigest before it is cached or returned. An
  answer in which any chunk fails is not used at all: something on the path corrupts bytes, so each
  reader asks again for its own chunks only, and a read fails (EIO) only when its own chunks do.

Retries of faulty answers and the fallback for registries that refuse multi-range requests are the
registry client's (lazybuild/registry/session.py, ranges.py).

Where the bytes come from is fetch.py's business (a registry blob, or a whole layer converted
locally); what to fetch before anyone asks is prefetch.py's.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from lazybuild import estargz
from lazybuild.digest import InvalidDigest, check_digest
from lazybuild.errors import MountError
from lazybuild.estargz import LayerReader, TOCEntry

from .cache import ChunkCache

if TYPE_CHECKING:
    from .fetch import RemoteBlob

log = logging.getLogger("lazybuild.mount")
# The window `lazybuild mount` and the builder read around a miss (fetch.open_layer sets it): about 20 ms
# at 200 Mbit/s, so on a slow link a window costs about one round trip more than a single chunk, and a
# tree of small files costs a request per window rather than per file.
WINDOW_BYTES = 512 << 10
# Where a window starts, and the least it shrinks to. A compiler's reads are scattered (a header here, a
# library there) and a big window around each brings mostly what is never read (the dev-image build:
# 21.9 MB fetched with no window, 24.3 MB with 64 KiB, 30.5 MB with 512 KiB); a tree read whole (diff,
# cp, tar) reads everything a window brings. So the window follows what its chunks are worth: when most
# of the chunks the last windows brought along have been read since, it doubles (up to the layer's
# read_around), when few have, it halves.
MIN_WINDOW_BYTES = 64 << 10
WINDOW_SAMPLE_CHUNKS = 16  # chunks brought along before their use decides the next window's size
# Two spans in one window closer than this are fetched as one range (the gap is a tar header or a cached
# file, cheaper to fetch again than to ask for one range more).
MERGE_GAP_BYTES = 16 << 10
# Requests per layer in flight at once; misses that arrive while that many are out wait and go together.
MAX_FETCHES_IN_FLIGHT = 4


def window_of(start: int, end: int, window: int) -> tuple[int, int]:
    """The `window`-aligned region of the blob that holds [start, end)."""
    return start // window * window, -(-end // window) * window


def plan_window(missed: list[TOCEntry], by_offset: list[TOCEntry], offsets: list[int], window: int,
                wanted: Callable[[TOCEntry], bool]) -> list[TOCEntry]:
    """The chunks to fetch along with `missed`: those lying whole inside the aligned windows of the missed
    chunks for which `wanted` says yes (uncached, not being fetched by someone else), each once, in blob
    order. `by_offset` is every chunk sorted by offset, `offsets` their offsets (for bisect)."""
    if window <= 0:
        return []
    regions = sorted({window_of(c.offset, c.compressed_end, window) for c in missed})
    merged: list[list[int]] = []
    for lo, hi in regions:  # overlapping windows (a missed chunk wider than one) are walked once
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out = []
    for lo, hi in merged:
        for n in by_offset[bisect.bisect_left(offsets, lo):bisect.bisect_left(offsets, hi)]:
            if n.compressed_end <= hi and wanted(n):
                out.append(n)
    return out


def merge_spans(spans: list[tuple[int, int]], window: int, gap: int = MERGE_GAP_BYTES) -> list[tuple[int, int]]:
    """[start, end) spans sorted, joined where they touch, or where the gap between them is at most `gap`
    and inside one `window`-aligned region (so the bytes fetched stay inside the windows planned)."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged:
            last = merged[-1]
            between = a - last[1]
            same_window = window > 0 and (last[1] - 1) // window == a // window
            if between <= 0 or (between <= gap and same_window):
                last[1] = max(last[1], b)
                continue
        merged.append([a, b])
    return [(a, b) for a, b in merged]


@dataclass
class FetchJob:
    """One reader's chunks to fetch, and what came of it (filled in by whoever sent the request)."""
    chunks: list[TOCEntry]
    done: bool = False
    data: dict[int, bytes] = field(default_factory=dict)  # verified bytes by id(chunk)
    errors: dict[int, Exception] = field(default_factory=dict)  # chunks that failed verification
    failure: BaseException | None = None  # the request itself failed


class FetchQueue:
    """Group commit for one layer's fetches: up to `limit` requests in flight; jobs that arrive while
    that many are out wait, and the first of them to get a turn sends every waiting job's chunks in
    one request. A reader alone is never delayed (its request goes out at once)."""

    def __init__(self, fetch: Callable[[list[TOCEntry]], tuple[dict[int, bytes], dict[int, Exception]]],
                 limit: int = MAX_FETCHES_IN_FLIGHT):
        self.fetch, self.limit = fetch, limit
        self._cond = threading.Condition()
        self._waiting: list[FetchJob] = []
        self._in_flight = 0
        self.requests = 0  # batches sent (each one read_many call)
        self.jobs = 0

    def run(self, job: FetchJob) -> None:
        with self._cond:
            self._waiting.append(job)
            self.jobs += 1
            while not job.done and (self._in_flight >= self.limit or not any(j is job for j in self._waiting)):
                self._cond.wait()
            if job.done:  # another job's turn took ours along
                return
            batch, self._waiting = self._waiting, []
            self._in_flight += 1
            self.requests += 1
        try:
            data, errors = self.fetch([c for j in batch for c in j.chunks])
            for j in batch:
                j.data, j.errors = data, errors
        except BaseException as e:  # every job of the batch learns it (and raises it to its reader)
            for j in batch:
                j.failure = e
        finally:
            with self._cond:
                self._in_flight -= 1
                for j in batch:
                    j.done = True
                self._cond.notify_all()


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
    read_around: int = 0  # > 0: a miss also brings the uncached chunks of its aligned window, up to this size
    _window_now: int = 0  # the current window size (see _window_size), 0 before the first miss
    _ahead: set = field(default_factory=set)  # keys of chunks windows brought along, not read yet
    _ahead_brought: int = 0
    _ahead_used: int = 0
    queue: FetchQueue | None = None  # the remote layer's fetches (made in __post_init__)

    def __post_init__(self) -> None:
        self.queue = FetchQueue(self._fetch_remote)
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
        if self._ahead:
            for c in wanted:
                self._note_read(self.cache_key(c))
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - (wanted[0].chunk_offset if wanted else 0)
        return out[start:start + size]

    def load(self, chunks: list[TOCEntry]) -> dict[int, bytes]:
        """The verified bytes of each chunk (by id()), from the cache or fetched together with their window."""
        out: dict[int, bytes] = {}
        missing = []
        for c in chunks:
            key = self.cache_key(c)
            hit = self.cache.get(key)
            if hit is not None:
                out[id(c)] = hit
                self.stats.served_from_cache += len(hit)
                if self._ahead:
                    self._note_read(key)
            else:
                missing.append(c)
        if not missing:
            return out
        held = []
        try:
            for lk in self._locks_for(missing):  # one fetch per chunk: a second reader waits for the first
                lk.acquire()
                held.append(lk)
            still = []
            for c in missing:
                hit = self.cache.get(self.cache_key(c))  # what the fetch we waited for brought
                if hit is not None:
                    out[id(c)] = hit
                    self._note_read(self.cache_key(c))
                else:
                    still.append(c)
            if still:
                out.update(self._fetch(still, held))
        finally:  # every lock taken is given back, whatever failed: a held lock hangs every later reader
            for lk in held:
                lk.release()
        return out

    def _fetch(self, chunks: list[TOCEntry], held: list[threading.Lock]) -> dict[int, bytes]:
        """Fetch `chunks` (their locks held) and their window; the window's locks are added to `held`."""
        if self.remote is None:  # a layer converted locally: its reader reads the local file
            return {id(c): self.store(c, self.reader.read_chunk(c)) for c in chunks}
        job = FetchJob(chunks + self._window(chunks, held))
        self.queue.run(job)
        if job.failure is not None:
            raise job.failure
        data, errors = job.data, job.errors
        if errors:  # nothing of that answer was kept: ask for our own chunks alone, once
            log.warning("layer %d: %d chunk(s) of an answer failed verification (%s); asking for the %d "
                        "chunk(s) read alone", self.index, len(errors), next(iter(errors.values())), len(chunks))
            data, errors = self._fetch_remote(chunks)
        for c in chunks:
            if id(c) in errors:
                raise errors[id(c)]
        return {id(c): data[id(c)] for c in chunks}

    def _window(self, chunks: list[TOCEntry], held: list[threading.Lock]) -> list[TOCEntry]:
        """The uncached chunks of the `read_around`-aligned windows of `chunks` whose lock is free (taken
        here, added to `held`): the files next to a file read are usually read next (a package's modules,
        a tree that is diffed or copied), and bringing them in the same request saves a round trip each.
        A neighbour whose lock is taken is being fetched (a reader, the prefetch): it is not waited for."""
        if not self.read_around:
            return []
        keys = {self.cache_key(c) for c in chunks}

        def wanted(n: TOCEntry) -> bool:
            k = self.cache_key(n)
            if k in keys or self.cache.has(k):
                return False
            lk = self.chunk_lock(k)
            if not lk.acquire(blocking=False):
                return False
            if self.cache.has(k):  # stored between the look and the lock
                lk.release()
                return False
            held.append(lk)
            keys.add(k)
            return True

        by_offset, offsets = self._chunk_index()
        extra = plan_window(chunks, by_offset, offsets, self._window_size(), wanted)
        self._note_ahead(extra)
        return extra

    def _window_size(self) -> int:
        """The window for this miss: doubled when at least half the chunks the last windows brought
        along were read since, halved when under a quarter were; between MIN_WINDOW_BYTES and read_around."""
        with self._guard:
            size = self._window_now or min(self.read_around, MIN_WINDOW_BYTES)
            if self._ahead_brought >= WINDOW_SAMPLE_CHUNKS:
                used = self._ahead_used / self._ahead_brought
                if used >= 0.5:
                    size = min(self.read_around, size * 2)
                elif used < 0.25:
                    size = max(min(self.read_around, MIN_WINDOW_BYTES), size // 2)
                self._ahead_brought = self._ahead_used = 0
            self._window_now = size
        return size

    def _note_ahead(self, chunks: list[TOCEntry]) -> None:
        """Chunks a window brings along (not asked for): a later read of one counts for the window."""
        with self._guard:
            if len(self._ahead) > 100_000:  # never read: forget them rather than grow
                self._ahead.clear()
            self._ahead.update(self.cache_key(c) for c in chunks)
            self._ahead_brought += len(chunks)

    def _note_read(self, key: str) -> None:
        if key in self._ahead:
            with self._guard:
                if key in self._ahead:
                    self._ahead.discard(key)
                    self._ahead_used += 1

    def _fetch_remote(self, chunks: list[TOCEntry]) -> tuple[dict[int, bytes], dict[int, Exception]]:
        """One request (multi-range) for `chunks`, each decoded and verified; cached only when every one
        verifies. Returns the verified bytes and the verification errors, both by id(chunk)."""
        spans = merge_spans([self.reader.compressed_range(c) for c in chunks], self.read_around)
        starts = [a for a, _ in spans]
        started = time.monotonic()
        parts = self.remote.read_many(spans)
        log.debug("layer %d: %d chunks in %d ranges, %d bytes, %.1f ms", self.index, len(chunks), len(spans),
                  sum(len(p) for p in parts), (time.monotonic() - started) * 1000)
        data: dict[int, bytes] = {}
        errors: dict[int, Exception] = {}
        for c in chunks:
            a, b = self.reader.compressed_range(c)
            i = bisect.bisect_right(starts, a) - 1  # the span that holds it
            ma = starts[i]
            try:
                data[id(c)] = self.reader.decode_chunk(c, parts[i][a - ma:b - ma])
            except estargz.EStargzError as e:  # never cached; whoever reads it gets the error
                errors[id(c)] = e
        if not errors:
            for c in chunks:
                self.store(c, data[id(c)])
        return data, errors

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
