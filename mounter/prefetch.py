"""Fetching ahead of reads: a layer's prefetch (`[0, .prefetch.landmark)`, what its workload reads
first, streamed in one request), the prefetch of a list of its files (a build profile: their chunks
in a few merged Range requests), and its background fetch (the rest, while no read is waiting).

Both only ever add verified chunks to the cache; a failure stops them and is logged, never served:
readers fetch whatever is missing on their own.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from lazybuild import estargz
from lazybuild.estargz import TOCEntry

from .layer import LazyLayer

log = logging.getLogger("lazybuild.mount")
FILES_MERGE_GAP_BYTES = 64 << 10  # a file prefetch joins ranges closer than this (the gap is fetched too)
FILES_REQUEST_BYTES = 16 << 20  # a file prefetch's request asks for at most this much
FILES_REQUEST_RANGES = 32  # and at most this many ranges (one multi-range request)
FILES_PARALLEL = 4  # requests in flight per layer
FILES_MAX_BYTES = 512 << 20  # compressed bytes a file prefetch plans per layer; later files are read lazily


class Prefetch:
    """The prefetch of one layer, planned and locked before the layer serves.

    Planning takes the locks of the chunks it will stream, so a read of a prefetched file waits for
    the stream to reach it instead of racing it with a request of its own. run() releases each lock
    as its chunk is stored (and every one left, whatever fails); a prefetch that will not run must be
    cancel()ed, or its readers wait forever."""

    def __init__(self, layer: LazyLayer, enabled: bool = True):
        self.layer = layer
        self.chunks = self._plan() if enabled else []
        layer.lock_chunks(self.chunks)

    def _plan(self) -> list[TOCEntry]:
        """The uncached chunks of [0, .prefetch.landmark), one per digest (identical files are fetched
        and locked once), in blob order."""
        layer = self.layer
        node = layer.reader.lookup(estargz.PREFETCH_LANDMARK)
        if node is None or layer.remote is None:
            return []
        end = node.entry.offset
        out, seen = [], set()
        for c in layer.payload_chunks():
            key = layer.cache_key(c)
            if c.compressed_end <= end and key not in seen and not layer.cache.has(key):
                seen.add(key)
                out.append(c)
        return out

    def cancel(self) -> None:
        """Release the locks without streaming."""
        chunks, self.chunks = self.chunks, []
        self.layer.unlock_chunks(chunks)

    def run(self) -> int:
        """Stream the planned chunks, caching each the moment its bytes are in. Returns the bytes
        streamed; never raises (the mount serves on, readers fetch what it did not bring)."""
        layer = self.layer
        chunks, self.chunks = self.chunks, []
        if not chunks:
            return 0
        pending = [(c, layer.chunk_lock(layer.cache_key(c))) for c in chunks]
        end = max(c.compressed_end for c in chunks)
        buf = bytearray()
        try:
            for data in layer.remote.stream(0, end):
                buf += data
                layer.stats.prefetched_bytes += len(data)
                while pending and pending[0][0].compressed_end <= len(buf):
                    chunk, lk = pending.pop(0)
                    a, b = layer.reader.compressed_range(chunk)
                    try:
                        layer.store(chunk, layer.reader.decode_chunk(chunk, bytes(buf[a:b])))
                    except estargz.EStargzError as e:
                        log.error("prefetch of layer %d: %s", layer.index, e)  # its reader will fetch and fail alone
                    finally:  # released whatever storing did: readers of this chunk wait on it
                        lk.release()
        except Exception as e:  # the mount still serves: readers fetch what the prefetch did not bring
            log.warning("prefetch of layer %d stopped: %s", layer.index, e)
        finally:
            for _, lk in pending:
                lk.release()
        return end


class FilePrefetch:
    """The prefetch of some files of one layer (a build profile's), planned and locked before the layer
    serves, as Prefetch is: a read of one of them waits for its chunks rather than fetching them again.

    Paths are only looked up in the layer's TOC (never on the host); names it does not hold are
    skipped. The uncached chunks are fetched in ranges merged across gaps up to FILES_MERGE_GAP_BYTES,
    packed into a few multi-range requests (FILES_REQUEST_RANGES ranges, FILES_REQUEST_BYTES bytes at
    most each), FILES_PARALLEL at a time, at most FILES_MAX_BYTES a layer; each chunk is verified against its digest (decode_chunk)
    before it is cached, and its lock released. `exclude`: chunk keys another prefetch of this layer
    already locked (taking them again would wait forever)."""

    def __init__(self, layer: LazyLayer, paths: list[str], exclude: set[str] = frozenset()):
        self.layer = layer
        self.files = 0  # of `paths`, the regular files the layer holds
        self.requests = 0  # requests sent
        self.fetched_bytes = 0
        self.failed = 0  # chunks that did not arrive or did not verify (their readers fetch them)
        self.chunks = self._plan(paths, set(exclude))
        self.planned = len(self.chunks)
        self._released: set[str] = set()
        self._guard = threading.Lock()
        layer.lock_chunks(self.chunks)

    def _plan(self, paths: list[str], exclude: set[str]) -> list[TOCEntry]:
        layer = self.layer
        if layer.remote is None:
            return []
        out, seen, size = [], exclude, 0
        for path in paths:  # first-read order: past FILES_MAX_BYTES, files read later are left to their reads
            try:
                node = layer.reader.lookup(path)
            except (estargz.EStargzError, ValueError):
                continue
            if node is None or node.entry.type != "reg":
                continue
            chunks = [c for c in layer.reader.chunks.get(node.entry.path) or []
                      if (k := layer.cache_key(c)) and k not in seen and not layer.cache.has(k)]
            cost = sum(c.compressed_end - c.offset for c in chunks)
            if size + cost > FILES_MAX_BYTES:
                continue
            self.files += 1
            size += cost
            for c in chunks:
                key = layer.cache_key(c)
                if key not in seen:  # a file may hold one chunk digest twice
                    seen.add(key)
                    out.append(c)
        return out

    def plan_requests(self) -> list[list[tuple[int, int, list[TOCEntry]]]]:
        """The requests: each a list of (start, end, chunks inside) ranges, in blob order."""
        spans: list[list] = []
        for c in sorted(self.chunks, key=lambda c: c.offset):
            a, b = self.layer.reader.compressed_range(c)
            last = spans[-1] if spans else None
            if last and a - last[1] <= FILES_MERGE_GAP_BYTES and max(b, last[1]) - last[0] <= FILES_REQUEST_BYTES:
                spans[-1][1] = max(spans[-1][1], b)
                spans[-1][2].append(c)
            else:
                spans.append([a, b, [c]])
        requests: list[list[tuple[int, int, list[TOCEntry]]]] = []
        size = 0
        for a, b, cs in spans:
            if not requests or len(requests[-1]) >= FILES_REQUEST_RANGES or size + (b - a) > FILES_REQUEST_BYTES:
                requests.append([])
                size = 0
            requests[-1].append((a, b, cs))
            size += b - a
        return requests

    def _release(self, chunks: list[TOCEntry]) -> None:
        with self._guard:
            keys = {self.layer.cache_key(c) for c in chunks} - self._released
            self._released |= keys
        for k in keys:
            self.layer.chunk_lock(k).release()

    def cancel(self) -> None:
        """Release the locks without fetching."""
        chunks, self.chunks = self.chunks, []
        self._release(chunks)

    def run(self) -> int:
        """Fetch the planned chunks; returns the bytes fetched. Never raises: what it could not bring,
        readers fetch on their own."""
        try:
            requests = self.plan_requests()
            if requests:
                with ThreadPoolExecutor(max_workers=min(FILES_PARALLEL, len(requests))) as pool:
                    list(pool.map(self._request, requests))
        except Exception as e:  # noqa: BLE001 - the mount serves on
            log.warning("file prefetch of layer %d stopped: %s", self.layer.index, e)
        finally:
            self.cancel()  # whatever is still locked
        return self.fetched_bytes

    def _request(self, request: list[tuple[int, int, list[TOCEntry]]]) -> None:
        layer = self.layer
        try:
            with self._guard:
                self.requests += 1
            parts = layer.remote.read_many([(a, b) for a, b, _ in request])
            for (a, b, chunks), part in zip(request, parts):
                with self._guard:
                    self.fetched_bytes += len(part)
                layer.stats.prefetched_bytes += len(part)
                for c in chunks:
                    ca, cb = layer.reader.compressed_range(c)
                    try:
                        layer.store(c, layer.reader.decode_chunk(c, part[ca - a:cb - a]))
                    except estargz.EStargzError as e:  # never cached: its reader fetches it and fails alone
                        self.failed += 1
                        log.error("file prefetch of layer %d: %s", layer.index, e)
                    finally:
                        self._release([c])
        except Exception as e:  # noqa: BLE001 - readers fetch what did not come
            log.warning("file prefetch of layer %d: a request failed: %s", layer.index, e)
        finally:
            self._release([c for _, _, cs in request for c in cs])


def background_fetch(layer: LazyLayer, stop: threading.Event, idle_s: float = 0.5, batch_bytes: int = 4 << 20) -> None:
    """Fetch the rest of the layer while nothing else reads it (reads always go first), in batches of
    about `batch_bytes`, each once the layer has had no read for `idle_s`; until `stop` is set."""
    if layer.remote is None:
        return
    batch: list[TOCEntry] = []
    size = 0
    for c in layer.payload_chunks():
        if stop.is_set():
            return
        if layer.cache.has(layer.cache_key(c)):
            continue
        batch.append(c)
        size += c.compressed_end - c.offset
        if size >= batch_bytes:
            _background_batch(layer, batch, stop, idle_s)
            batch, size = [], 0
    if batch:
        _background_batch(layer, batch, stop, idle_s)


def _background_batch(layer: LazyLayer, batch: list[TOCEntry], stop: threading.Event, idle_s: float) -> None:
    while not stop.is_set() and time.monotonic() - layer.last_read < idle_s:
        time.sleep(idle_s)
    if stop.is_set():
        return
    try:
        layer.load(batch)
    except Exception as e:  # background work never takes the mount down; reads retry on their own
        log.warning("background fetch of layer %d: %s", layer.index, e)
