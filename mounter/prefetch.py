"""Fetching ahead of reads: a layer's prefetch (`[0, .prefetch.landmark)`, what its workload reads
first, streamed in one request) and its background fetch (the rest, while no read is waiting).

Both only ever add verified chunks to the cache; a failure stops them and is logged, never served:
readers fetch whatever is missing on their own.
"""

from __future__ import annotations

import logging
import threading
import time

from lazybuild import estargz
from lazybuild.estargz import TOCEntry

from .layer import LazyLayer

log = logging.getLogger("lazybuild.mount")


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
