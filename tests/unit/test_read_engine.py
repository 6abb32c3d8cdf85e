"""The read engine's parts without FUSE or a registry (mounter/layer.py): window planning and span merging
(properties), the per-layer fetch queue (misses that arrive together go together), one fetch per chunk,
and verification of everything a window brings. A layer of small files is read through a stand-in of the
registry's two read calls that counts requests and can be slow, gated or corrupt.

The engine on a real registry, FUSE and a slow or faulty proxy is tests/integration/test_read_engine_mount.py."""

from __future__ import annotations

import io
import os
import random
import tarfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazybuild import estargz
from lazybuild.estargz import TOCEntry
from lazybuild.image import Descriptor
from lazybuild.mounter import ChunkCache, LayerStats, LazyLayer, fetch_layer
from lazybuild.mounter.layer import (MAX_FETCHES_IN_FLIGHT, MIN_WINDOW_BYTES, FetchJob, FetchQueue, merge_spans,
                                     plan_window, window_of)

# --- window planning (pure) -----------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(chunks in blob order, the missed one's index, cached indices, window): chunks of 1 B-40 KiB with
    gaps of 0-600 bytes (tar headers) between them."""
    sizes = draw(st.lists(st.integers(1, 40_000), min_size=1, max_size=120))
    gaps = draw(st.lists(st.integers(0, 600), min_size=len(sizes), max_size=len(sizes)))
    chunks, pos = [], draw(st.integers(0, 3000))
    for i, (size, gap) in enumerate(zip(sizes, gaps)):
        pos += gap
        c = TOCEntry(name=f"f{i}", type="chunk", offset=pos)
        c.compressed_end = pos + size
        chunks.append(c)
        pos += size
    missed = draw(st.integers(0, len(chunks) - 1))
    cached = draw(st.sets(st.integers(0, len(chunks) - 1))) - {missed}
    window = draw(st.sampled_from([4096, 65536, 100_000, 512 << 10, 1 << 20]))
    return chunks, missed, cached, window


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_a_window_plan_stays_in_the_window_covers_the_miss_and_skips_cached_chunks(layout):
    chunks, missed, cached, window = layout
    index = {id(c): i for i, c in enumerate(chunks)}
    m = chunks[missed]
    plan = plan_window([m], chunks, [c.offset for c in chunks], window,
                       lambda n: index[id(n)] not in cached and n is not m)
    lo, hi = window_of(m.offset, m.compressed_end, window)
    planned = [index[id(c)] for c in plan]
    assert len(planned) == len(set(planned)) and missed not in planned
    assert not set(planned) & cached
    assert all(lo <= c.offset and c.compressed_end <= hi for c in plan)
    # Complete: every uncached chunk lying whole in the window comes along.
    whole = {i for i, c in enumerate(chunks) if lo <= c.offset and c.compressed_end <= hi}
    assert set(planned) == whole - cached - {missed}

    spans = merge_spans([(c.offset, c.compressed_end) for c in [m, *plan]], window)
    assert spans == sorted(spans) and all(a < b for a, b in spans)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # disjoint, not touching
    for c in [m, *plan]:  # each chunk inside one span
        assert any(a <= c.offset and c.compressed_end <= b for a, b in spans)
    assert all(lo <= a and b <= hi for a, b in spans)  # never more than the window
    assert sum(b - a for a, b in spans) <= hi - lo


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 50_000)), min_size=1, max_size=60),
       st.sampled_from([0, 4096, 65536, 512 << 10]))
def test_merged_spans_cover_every_span_and_only_bridge_small_gaps_inside_a_window(raw, window):
    spans = [(a, a + n) for a, n in raw]
    merged = merge_spans(spans, window, gap=2048)
    for a, b in spans:
        assert any(ma <= a and b <= mb for ma, mb in merged)
    covered = sorted(spans)
    for ma, mb in merged:  # every byte fetched is in a span, or in a small gap inside one window
        pos = ma
        for a, b in covered:
            if b <= pos or a >= mb:
                continue
            if a > pos:
                assert a - pos <= 2048 and window and pos // window == a // window, (pos, a)
            pos = max(pos, b)
        assert pos == mb


# --- the fetch queue --------------------------------------------------------------------------------------------


def test_misses_that_arrive_together_go_out_together():
    batches = []

    def fetch(chunks):
        batches.append(len(chunks))
        time.sleep(0.5)
        return {id(c): b"x" for c in chunks}, {}

    queue = FetchQueue(fetch, limit=2)
    jobs = [FetchJob([TOCEntry(name=f"c{i}", type="chunk") for _ in range(3)]) for i in range(12)]
    start = threading.Barrier(len(jobs))

    def reader(job):
        start.wait()
        queue.run(job)

    threads = [threading.Thread(target=reader, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(j.done and j.failure is None and all(id(c) in j.data for c in j.chunks) for j in jobs)
    assert sum(batches) == 36 and len(batches) <= 3, batches  # two at once, then the ten who waited together


def test_a_failed_request_fails_every_job_it_carried_and_the_queue_goes_on():
    calls = []

    def fetch(chunks):
        calls.append(len(chunks))
        if len(calls) == 1:
            raise OSError("connection reset")
        return {id(c): b"y" for c in chunks}, {}

    queue = FetchQueue(fetch, limit=1)
    first, second = FetchJob([TOCEntry(name="a", type="chunk")]), FetchJob([TOCEntry(name="b", type="chunk")])
    queue.run(first)
    assert isinstance(first.failure, OSError)
    queue.run(second)
    assert second.failure is None and second.data


# --- a layer of small files -------------------------------------------------------------------------------------


class SlowRegistry:
    """The two read calls of lazybuild.registry.Registry over blobs in memory: counts requests and
    ranges; can be slow (`delay_s`), held at a gate, or corrupt one blob offset."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs
        self.requests: list[list[tuple[int, int]]] = []
        self.delay_s = 0.0
        self.gate: threading.Event | None = None
        self.asked = threading.Event()
        self.corrupt_at: int | None = None
        self.lock = threading.Lock()

    def read_ranges(self, repository, digest, ranges):
        with self.lock:
            self.requests.append(list(ranges))
        self.asked.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        out = []
        for a, b in ranges:
            data = bytearray(self.blobs[digest][a:b])
            if self.corrupt_at is not None and a <= self.corrupt_at < b:
                data[self.corrupt_at - a] ^= 0xFF
            out.append(bytes(data))
        return out

    def stream_range(self, repository, digest, start, end):
        yield self.read_ranges(repository, digest, [(start, end)])[0]


SMALL = {f"d/f{i:03d}": random.Random(i).randbytes(random.Random(-i).randint(1000, 3000)) for i in range(200)}


@pytest.fixture
def small_layer(tmp_path):
    """open(window) -> a fresh LazyLayer of 200 incompressible files of 1-3 KiB (about 400 KiB) over one
    shared registry stand-in and its own chunk cache."""
    tar = tmp_path / "small.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in SMALL.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    built = estargz.build(str(tar), out)
    registry = SlowRegistry({built.digest: out.getvalue()})
    desc = Descriptor(built.media_type, built.digest, built.size, {estargz.TOC_DIGEST_ANNOTATION: built.toc_digest})
    count = iter(range(1000))

    def open_(window: int) -> LazyLayer:
        layer = fetch_layer(registry, "repo", desc).build(ChunkCache(str(tmp_path / f"cache{next(count)}")))
        layer.read_around = window
        registry.requests.clear()
        return layer
    return open_, registry


def _chunk(layer: LazyLayer, name: str) -> TOCEntry:
    return layer.reader.chunks[name][0]


def test_a_miss_brings_its_window_and_no_more(small_layer):
    open_, registry = small_layer
    layer = open_(64 << 10)
    toc_bytes = layer.stats.fetched_bytes
    name = "d/f100"
    assert layer.read(name, 0, len(SMALL[name])) == SMALL[name]
    assert len(registry.requests) == 1
    lo, hi = window_of(*layer.reader.compressed_range(_chunk(layer, name)), 64 << 10)
    assert all(lo <= a and b <= hi for a, b in registry.requests[0])
    for other in SMALL:
        a, b = layer.reader.compressed_range(_chunk(layer, other))
        assert layer.cache.has(layer.cache_key(_chunk(layer, other))) == (lo <= a and b <= hi), other
    assert layer.stats.fetched_bytes - toc_bytes <= 64 << 10
    brought = [n for n in SMALL if layer.cache.has(layer.cache_key(_chunk(layer, n)))]
    assert len(brought) > 10
    for n in brought:  # served from the cache, no request more
        assert layer.read(n, 0, len(SMALL[n])) == SMALL[n]
    assert len(registry.requests) == 1


def test_reading_every_file_costs_a_request_per_window_not_per_file(small_layer):
    open_, registry = small_layer
    layer = open_(64 << 10)
    names = list(SMALL)
    random.Random(1).shuffle(names)
    for n in names:
        assert layer.read(n, 0, len(SMALL[n])) == SMALL[n]
    windows = -(-layer.stats.size // (64 << 10))
    # A file across a window edge is in neither window: it costs a request of its own.
    assert len(registry.requests) <= 2 * windows + 1, (len(registry.requests), windows)
    assert len(registry.requests) < len(SMALL) // 5
    assert layer.stats.fetched_bytes <= 2 * layer.stats.size  # the TOC read at open, then each byte about once


def test_the_window_grows_for_reads_in_order_and_stays_small_for_scattered_ones(small_layer):
    """Reading the tree in blob order uses what each window brings, so windows double up to read_around
    (fewer requests than 64 KiB windows would take); reading one file in eight, spread over the layer,
    leaves most of what windows bring unread, so they stay at MIN_WINDOW_BYTES."""
    open_, registry = small_layer
    layer = open_(512 << 10)
    for n in SMALL:  # the tar's order is the blob's
        assert layer.read(n, 0, len(SMALL[n])) == SMALL[n]
    assert layer._window_now > MIN_WINDOW_BYTES
    assert len(registry.requests) < layer.stats.size // MIN_WINDOW_BYTES

    layer = open_(512 << 10)
    for n in list(SMALL)[::8]:
        assert layer.read(n, 0, len(SMALL[n])) == SMALL[n]
    assert layer._window_now == MIN_WINDOW_BYTES
    assert all(b - a <= MIN_WINDOW_BYTES for req in registry.requests for a, b in req)


def test_without_a_window_a_miss_fetches_only_itself(small_layer):
    open_, registry = small_layer
    layer = open_(0)
    assert layer.read("d/f010", 0, 10) == SMALL["d/f010"][:10]
    assert registry.requests == [[layer.reader.compressed_range(_chunk(layer, "d/f010"))]]


def test_a_second_reader_of_a_chunk_in_flight_waits_for_that_fetch(small_layer):
    open_, registry = small_layer
    layer = open_(64 << 10)
    registry.gate = threading.Event()
    got = []
    readers = [threading.Thread(target=lambda: got.append(layer.read("d/f050", 0, 100))) for _ in range(2)]
    readers[0].start()
    assert registry.asked.wait(5)
    readers[1].start()
    time.sleep(0.2)  # the second reader is now waiting on the chunk's lock
    neighbour = threading.Thread(target=lambda: got.append(layer.read("d/f051", 0, 100)))
    neighbour.start()  # in the same window: also waits for the first fetch rather than asking again
    time.sleep(0.2)
    registry.gate.set()
    for t in (*readers, neighbour):
        t.join(10)
    assert sorted(got) == sorted([SMALL["d/f050"][:100]] * 2 + [SMALL["d/f051"][:100]])
    assert len(registry.requests) == 1


def test_concurrent_misses_in_different_windows_share_requests(small_layer):
    open_, registry = small_layer
    layer = open_(16 << 10)
    registry.delay_s = 0.5
    names = list(SMALL)[::12]  # 17 files, each in a window of its own
    start = threading.Barrier(len(names))
    got = {}

    def reader(n):
        start.wait()
        got[n] = layer.read(n, 0, len(SMALL[n]))

    threads = [threading.Thread(target=reader, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {n: SMALL[n] for n in names}
    # MAX_FETCHES_IN_FLIGHT at once, then the misses that waited go together (a straggler may go alone).
    assert len(registry.requests) <= MAX_FETCHES_IN_FLIGHT + 2, [len(r) for r in registry.requests]
    assert max(len(r) for r in registry.requests) > 1  # the waiting misses went as one multi-range request


def test_a_window_never_serves_or_caches_an_unverified_chunk(small_layer):
    open_, registry = small_layer
    layer = open_(64 << 10)
    victim = _chunk(layer, "d/f101")
    registry.corrupt_at = layer.reader.compressed_range(victim)[0] + 30
    assert layer.read("d/f100", 0, len(SMALL["d/f100"])) == SMALL["d/f100"]  # its neighbour is corrupt
    assert not layer.cache.has(layer.cache_key(victim))
    # That answer was not used: f100 was asked for again, alone, and nothing else was kept.
    assert registry.requests[1:] == [[layer.reader.compressed_range(_chunk(layer, "d/f100"))]]
    assert [n for n in SMALL if layer.cache.has(layer.cache_key(_chunk(layer, n)))] == ["d/f100"]
    with pytest.raises(estargz.EStargzError):
        layer.read("d/f101", 0, 10)
    assert not layer.cache.has(layer.cache_key(victim))
    registry.corrupt_at = None
    assert layer.read("d/f101", 0, len(SMALL["d/f101"])) == SMALL["d/f101"]  # no lock was left held


def test_a_window_leaves_chunks_someone_else_is_fetching_to_them(small_layer):
    open_, registry = small_layer
    layer = open_(64 << 10)
    held = _chunk(layer, "d/f099")  # as a running prefetch holds the chunks it streams
    layer.lock_chunks([held])
    try:
        assert layer.read("d/f100", 0, 10) == SMALL["d/f100"][:10]
    finally:
        layer.unlock_chunks([held])
    assert not layer.cache.has(layer.cache_key(held))
    assert all(layer.reader.compressed_range(held) != r for req in registry.requests for r in req)
    assert layer.read("d/f099", 0, 10) == SMALL["d/f099"][:10]


def test_a_local_layer_reads_without_the_queue(tmp_path):
    data = os.urandom(5000)
    tar = tmp_path / "one.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("a")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    local = tmp_path / "one.esgz"
    with open(local, "wb") as out:
        estargz.build(str(tar), out)
    layer = LazyLayer(0, estargz.LayerReader.open_file(str(local)), ChunkCache(str(tmp_path / "c")),
                      LayerStats("local", os.path.getsize(local)), None, read_around=64 << 10)
    assert layer.read("a", 0, 5000) == data and layer.queue.requests == 0
