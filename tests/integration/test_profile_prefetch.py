"""The mounter's FilePrefetch (a build profile's files fetched at once) on a real registry behind the
counting, misbehaving proxy, without FUSE: few merged requests, every chunk verified before it is cached,
a read of a planned file waits for the prefetch instead of asking again, names a layer does not hold (or
that climb out) are only looked up in the TOC and skipped, and a corrupt answer is never cached."""

from __future__ import annotations

import threading

import pytest

from lazybuild import estargz
from lazybuild.mounter import ChunkCache, FilePrefetch, fetch_layer
from lazybuild.registry import Reference, Registry
from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.cli_runner import lazybuild
from support.registry import FaultProxy


@pytest.fixture(scope="module")
def layer_desc(registry, tmp_path_factory):
    d = tmp_path_factory.mktemp("prefetch-base")
    archive = docker_archive([debootstrap_rootfs(("python3", "python3-venv"))], str(d / "base.tar"))
    ref = f"{registry.host}/profile/prefetch:1"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    with Registry(registry.host) as reg:
        return reg.resolve(Reference.parse(ref)).manifest.layers[0]


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def open_lazy(proxy, desc, cache_dir):
    reg = Registry(proxy.host)
    fetched = fetch_layer(reg, "profile/prefetch", desc)
    fetched.verify_toc(desc.annotations[estargz.TOC_DIGEST_ANNOTATION])
    return fetched.build(ChunkCache(str(cache_dir), 1 << 30)), reg


def blob_gets(proxy, since):
    return sum(1 for _, method, path, _ in proxy.requests[since:] if method == "GET" and "/blobs/sha256:" in path)


def test_profile_files_come_in_few_verified_requests_and_readers_wait(proxy, layer_desc, tmp_path):
    layer, reg = open_lazy(proxy, layer_desc, tmp_path / "cache")
    try:
        paths = [p for p in layer.reader.chunks if p.startswith("usr/share/doc/") and p.endswith("/copyright")]
        assert len(paths) > 50
        # The HTTP requests the prefetch alone sends (the registry client splits a read whose ranges lie far
        # apart into several requests), on a cache of its own: the same prefetch with a reader waiting on it
        # must send exactly these.
        alone, alone_reg = open_lazy(proxy, layer_desc, tmp_path / "cache-alone")
        try:
            n = len(proxy.requests)
            FilePrefetch(alone, paths).run()
            prefetch_gets = blob_gets(proxy, n)
        finally:
            alone_reg.close()
        n0 = len(proxy.requests)
        fp = FilePrefetch(layer, paths + ["../../../etc/shadow", "no/such/file", "usr/share/doc", "etc/../../x"])
        assert fp.files == len(paths) and fp.planned > 0
        got = {}
        reader = threading.Thread(target=lambda: got.update(data=layer.read(paths[-1], 0, 1 << 20)))
        reader.start()  # its chunks are locked by the plan: it waits for the prefetch, never asks itself
        fp.run()
        reader.join()
        assert blob_gets(proxy, n0) == prefetch_gets, "the waiting reader sent a request of its own"
        assert 1 <= fp.requests <= 4 and prefetch_gets * 10 < len(paths), (fp.requests, prefetch_gets)
        assert fp.failed == 0 and fp.fetched_bytes > 0
        for p in paths:
            for c in layer.reader.chunks[p]:
                assert layer.cache.has(layer.cache_key(c)), p
        assert len(got["data"]) == min(1 << 20, layer.reader.lookup(paths[-1]).entry.size) > 0
        n1 = len(proxy.requests)
        for p in paths:  # everything it brought is served from the cache: no request at all
            layer.read(p, 0, 1 << 20)
        assert blob_gets(proxy, n1) == 0
        assert FilePrefetch(layer, paths).planned == 0  # a second plan finds them cached
    finally:
        reg.close()


def test_a_corrupt_answer_is_never_cached(proxy, layer_desc, tmp_path):
    layer, reg = open_lazy(proxy, layer_desc, tmp_path / "cache")
    try:
        paths = [p for p in layer.reader.chunks if p.startswith("usr/lib/python3.11/") and p.endswith(".py")][:80]
        proxy.faults["corrupt_ranges"] = True  # a byte flipped in the middle of every ranged answer
        fp = FilePrefetch(layer, paths)
        fp.run()
        assert fp.failed >= 1
        bad = [c for p in paths for c in layer.reader.chunks[p] if not layer.cache.has(layer.cache_key(c))]
        assert len(bad) >= fp.failed
        proxy.faults.pop("corrupt_ranges")
        for p in paths:  # what was cached verified; the rest is fetched (and verified) by its reader
            data = layer.read(p, 0, 1 << 30)
            node = layer.reader.lookup(p)
            assert len(data) == node.entry.size
    finally:
        reg.close()
