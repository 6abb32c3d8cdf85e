"""The mounter's pure model without FUSE or a registry: layers read through a registry stand-in that
serves a real eStargz blob from memory, the prefetch and background fetch, the trees.

What a mount adds on top (the kernel, a real registry, faults) is tested in test_mount.py."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import threading

import pytest

from lazybuild import estargz
from lazybuild.estargz import LayerReader
from lazybuild.image import Descriptor
from lazybuild.mounter import (ChunkCache, LayerDirs, LayerStats, LazyLayer, NotEStargz, Prefetch, background_fetch,
                               fetch_layer)
from lazybuild.mounter.rootfs import LayersTree, MergedTree


class StandInRegistry:
    """The two calls a layer makes of lazybuild.registry.Registry, over blobs held in memory; it counts
    requests and can be told to fail or to corrupt what it sends."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs
        self.requests = 0
        self.fail = False
        self.corrupt_at: int | None = None  # this blob offset is sent with its bits flipped
        self.stream_fails_after: int | None = None  # the stream breaks after this many bytes

    def _bytes(self, digest: str, a: int, b: int) -> bytes:
        if self.fail:
            raise OSError("the registry is gone")
        data = bytearray(self.blobs[digest][a:b])
        if self.corrupt_at is not None and a <= self.corrupt_at < b:
            data[self.corrupt_at - a] ^= 0xFF
        return bytes(data)

    def read_ranges(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.requests += 1
        return [self._bytes(digest, a, b) for a, b in ranges]

    def stream_range(self, repository: str, digest: str, start: int, end: int):
        self.requests += 1
        for a in range(start, end, 1000):
            if self.stream_fails_after is not None and a >= self.stream_fails_after:
                raise OSError("connection reset")
            yield self._bytes(digest, a, min(a + 1000, end))


def _tar(path, files: dict[str, bytes | None]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def _blob(tmp_path, name, files, **options) -> tuple[bytes, estargz.LayerBlob]:
    out = io.BytesIO()
    built = estargz.build(_tar(tmp_path / f"{name}.tar", files), out, **options)
    return out.getvalue(), built


FILES = {f"d/f{i}": os.urandom(20_000) for i in range(6)}


@pytest.fixture
def remote_layer(tmp_path):
    """(open(), registry, files): open() fetches and builds the layer anew over one chunk cache; the first
    two files are prioritized (before the prefetch landmark), chunks are 8 KiB."""
    data, built = _blob(tmp_path, "l", {"d/": None, **FILES}, chunk_size=8192, prioritized_files=["d/f0", "d/f1"])
    registry = StandInRegistry({built.digest: data})
    desc = Descriptor(built.media_type, built.digest, built.size, {estargz.TOC_DIGEST_ANNOTATION: built.toc_digest})
    cache = ChunkCache(str(tmp_path / "cache"))

    def open_() -> LazyLayer:
        fetched = fetch_layer(registry, "repo", desc)
        fetched.verify_toc(built.toc_digest)
        return fetched.build(cache)
    return open_, registry


def test_reads_are_verified_cached_and_fetched_in_one_request(remote_layer):
    open_, registry = remote_layer
    layer = open_()
    registry.requests = 0
    assert layer.read("d/f3", 5000, 7000) == FILES["d/f3"][5000:12000]  # spans two of its three chunks
    assert registry.requests == 1 and layer.stats.fetched_bytes > 0
    fetched = layer.stats.fetched_bytes
    assert layer.read("d/f3", 0, 20000) == FILES["d/f3"]
    assert registry.requests == 2 and layer.stats.fetched_bytes < 2 * fetched  # only the chunk not read before
    again = open_()  # a second mount of the same layer: the shared cache serves it
    registry.requests = 0
    assert again.read("d/f3", 0, 20000) == FILES["d/f3"] and registry.requests == 0
    assert again.stats.served_from_cache == 20000


def test_a_corrupt_chunk_is_never_served_or_cached_and_locks_are_released(remote_layer):
    open_, registry = remote_layer
    layer = open_()
    chunk = layer.reader.chunks["d/f4"][0]
    registry.corrupt_at = layer.reader.compressed_range(chunk)[0] + 20
    with pytest.raises(estargz.EStargzError):
        layer.read("d/f4", 0, 100)
    assert not layer.cache.has(layer.cache_key(chunk))
    registry.corrupt_at = None
    assert layer.read("d/f4", 0, 100) == FILES["d/f4"][:100]  # would hang on a lock left held


def test_a_cache_that_cannot_store_still_serves_verified_bytes(tmp_path, remote_layer):
    open_, _ = remote_layer
    layer = open_()
    (tmp_path / "not-a-dir").write_text("")
    layer.cache = ChunkCache(str(tmp_path / "not-a-dir" / "cache"))  # every store fails (ENOTDIR)
    assert layer.read("d/f5", 0, 20000) == FILES["d/f5"]
    assert layer.cache.store_failures > 0


def test_prefetch_streams_to_the_landmark_and_holds_its_chunks_until_stored(remote_layer):
    open_, registry = remote_layer
    layer = open_()
    assert layer.has_prefetch_landmark
    prefetch = Prefetch(layer)
    planned = {layer.cache_key(c) for c in prefetch.chunks}
    prioritized = {layer.cache_key(c) for p in ("d/f0", "d/f1") for c in layer.reader.chunks[p]}
    assert planned == prioritized
    lock = layer.chunk_lock(next(iter(planned)))
    assert not lock.acquire(blocking=False)  # a reader of a prefetched chunk waits for the stream
    registry.requests = 0
    assert prefetch.run() > 0 and registry.requests == 1
    assert all(layer.cache.has(k) for k in planned) and layer.stats.prefetched_bytes > 0
    assert lock.acquire(blocking=False)
    lock.release()
    assert layer.read("d/f1", 0, 20000) == FILES["d/f1"] and registry.requests == 1
    assert Prefetch(open_()).chunks == []  # nothing left to prefetch


@pytest.mark.parametrize("fault", ["broken stream", "corrupt chunk", "cancelled"])
def test_a_prefetch_that_fails_releases_every_lock(remote_layer, fault):
    open_, registry = remote_layer
    layer = open_()
    prefetch = Prefetch(layer)
    keys = [layer.cache_key(c) for c in prefetch.chunks]
    if fault == "broken stream":
        registry.stream_fails_after = 10_000
        prefetch.run()
    elif fault == "corrupt chunk":
        registry.corrupt_at = layer.reader.compressed_range(prefetch.chunks[1])[0] + 10
        prefetch.run()
        assert not layer.cache.has(keys[1]) and layer.cache.has(keys[0])
    else:
        prefetch.cancel()
    for key in keys:
        lock = layer.chunk_lock(key)
        assert lock.acquire(blocking=False), key
        lock.release()
    registry.stream_fails_after = registry.corrupt_at = None
    assert layer.read("d/f0", 0, 20000) == FILES["d/f0"]


def test_prefetch_disabled_or_without_a_landmark_plans_nothing(tmp_path, remote_layer):
    open_, _ = remote_layer
    assert Prefetch(open_(), enabled=False).chunks == []
    data, built = _blob(tmp_path, "plain", {"a": b"x" * 100})
    layer = fetch_layer(StandInRegistry({built.digest: data}), "repo",
                        Descriptor(built.media_type, built.digest, built.size)).build(ChunkCache(str(tmp_path / "c2")))
    assert not layer.has_prefetch_landmark and Prefetch(layer).chunks == []


def test_background_fetch_brings_the_rest_and_stops_when_told(remote_layer):
    open_, registry = remote_layer
    layer = open_()
    stop = threading.Event()
    stop.set()
    background_fetch(layer, stop, idle_s=0)
    assert registry.requests == 1  # only the TOC: a stopped fetch fetches nothing
    background_fetch(layer, threading.Event(), idle_s=0, batch_bytes=30_000)
    assert all(layer.cache.has(k) for k in layer.chunk_keys())
    registry.fail = True
    for name, data in FILES.items():
        assert layer.read(name, 0, len(data)) == data


def test_toc_reads_are_kept_and_replayed_and_checked(tmp_path):
    data, built = _blob(tmp_path, "k", {"a": b"kept" * 1000})
    registry = StandInRegistry({built.digest: data})
    desc = Descriptor(built.media_type, built.digest, built.size)
    kept = tmp_path / "toc"
    first = fetch_layer(registry, "repo", desc, toc_dir=str(kept))
    assert first.toc_digest == built.toc_digest and os.listdir(kept)
    registry.fail = True
    again = fetch_layer(registry, "repo", desc, toc_dir=str(kept))  # no registry needed
    again.verify_toc(built.toc_digest)
    for name in os.listdir(kept):  # what is kept is a cache, never trusted: a changed TOC is refused
        path = kept / name
        if path.stat().st_size > 100:
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 1
            path.write_bytes(bytes(raw))
    with pytest.raises(estargz.EStargzError):
        fetch_layer(registry, "repo", desc, toc_dir=str(kept)).verify_toc(built.toc_digest)


def test_a_blob_that_is_not_estargz_is_reported_as_such(tmp_path):
    data = gzip.compress(open(_tar(tmp_path / "p.tar", {"a": b"plain"}), "rb").read())
    registry = StandInRegistry({"sha256:" + "0" * 64: data})
    with pytest.raises(NotEStargz):
        fetch_layer(registry, "repo", Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "0" * 64,
                                                 len(data)))


def _local_layer(tmp_path, index, files) -> LazyLayer:
    out = tmp_path / f"l{index}.esgz"
    with open(out, "wb") as f:
        estargz.build(_tar(tmp_path / f"l{index}.tar", files), f)
    return LazyLayer(index, LayerReader.open_file(str(out)), ChunkCache(str(tmp_path / "c")), LayerStats("x", 1))


LOWER = {"a/": None, "a/keep": b"k", "a/gone": b"g", "o/": None, "o/old": b"o", "f": b"lower"}
UPPER = {"a/.wh.gone": b"", "o/": None, "o/.wh..wh..opq": b"", "o/new": b"n", "f": b"upper!"}


def test_merged_tree_applies_whiteouts_opaque_dirs_and_replacements(tmp_path):
    tree = MergedTree([_local_layer(tmp_path, 0, LOWER), _local_layer(tmp_path, 1, UPPER)])
    names = lambda path: sorted(tree.inodes[tree.ino_at(path)].children)  # noqa: E731
    assert names("") == [estargz.NO_PREFETCH_LANDMARK, "a", "f", "o"] and names("a") == ["keep"] and names("o") == ["new"]
    f = tree.lookup(1, "f")
    assert tree.read(f.ino, 0, 100) == b"upper!" and f.layer == 1
    assert tree.read(f.ino, 100, 10) == b""  # past the end


def test_layers_tree_shows_whiteouts_as_overlayfs_lower_dirs_do(tmp_path):
    tree = LayersTree([_local_layer(tmp_path, 0, LOWER), _local_layer(tmp_path, 1, UPPER)])
    top = tree.lookup(1, "1")
    gone = tree.lookup(tree.lookup(top.ino, "a").ino, "gone")
    assert stat.S_ISCHR(gone.mode) and (gone.entry.dev_major, gone.entry.dev_minor) == (0, 0)
    assert tree.lookup(top.ino, "o").entry.xattrs == {"trusted.overlay.opaque": b"y"}
    assert sorted(tree.inodes[tree.lookup(1, "0").ino].children) == [estargz.NO_PREFETCH_LANDMARK, "a", "f", "o"]


def test_layer_dirs_are_reserved_then_filled_failed_or_removed(tmp_path):
    dirs = LayerDirs()
    layer = _local_layer(tmp_path, 0, LOWER)
    dirs.reserve("7")
    ino = dirs.lookup(1, "7").ino
    assert not dirs.ready(ino) and "7" in dirs and dirs.built() == {}
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(dirs.wait_ready(ino)))
    waiter.start()
    assert dirs.fill("7", layer)
    waiter.join(5)
    assert waited == [True] and dirs.ready(ino) and dirs.built() == {"7": layer}
    f = dirs.lookup(ino, "f")
    assert dirs.read(f.ino, 0, 100) == b"lower"
    assert dirs.remove("7") is layer and dirs.lookup(1, "7") is None and f.ino not in dirs.inodes

    dirs.reserve("8")
    dirs.fail("8")
    assert dirs.wait_ready(dirs.lookup(1, "8").ino) is False  # EIO, never an empty directory
    dirs.reserve("9")
    assert dirs.remove("9") is None and dirs.fill("9", layer) is False  # removed while it was built
    with pytest.raises(ValueError):
        dirs.reserve("8")
