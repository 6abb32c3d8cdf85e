"""The read engine on a real registry, real FUSE and the `lazybuild mount` CLI: a layer of a few thousand
small files read through a proxy that is slow, fails every third request, or refuses multi-range
requests. Each must read back exactly (diff -r against the source tree) in far fewer requests than
there are files; requests are counted at the proxy. The timeouts are only a bound against hanging.

The engine's parts without services (window planning, batching, one fetch per chunk) are in
tests/unit/test_read_engine.py."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lazybuild.digest import sha256_digest
from lazybuild.registry import Registry
from lazybuild.testing.images import docker_archive
from support.cli_runner import lazybuild
from support.slowproxy import SlowProxy

FILES = 3000
DIFF_TIMEOUT_S = 180


def _small_tree(root: str, count: int, seed: int = 7) -> list[str]:
    """`count` files of 1-8 KiB in 30 directories, half text and half random bytes; their paths."""
    rnd = random.Random(seed)
    words = [b"lazy", b"stargz", b"chunk", b"window", b"registry", b"layer", b"\n"]
    paths = []
    for i in range(count):
        rel = f"d{i % 30:02d}/f{i:05d}.{'txt' if i % 2 else 'bin'}"
        size = rnd.randint(1024, 8192)
        data = (b" ".join(rnd.choice(words) for _ in range(size // 4))[:size] if i % 2
                else rnd.randbytes(size))
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        paths.append(rel)
    return paths


@pytest.fixture(scope="module")
def small_files(registry, tmp_path_factory):
    """The tree on disk, its paths, and its eStargz image in the registry."""
    d = tmp_path_factory.mktemp("small-files")
    src = str(d / "src")
    paths = _small_tree(src, FILES)
    tar = str(d / "layer.tar")
    with tarfile.open(tar, "w") as tf:
        for top, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(top, name)
                tf.add(full, os.path.relpath(full, src))
    ref = f"{registry.host}/engine/small:esgz"
    lazybuild("convert", f"docker-archive:{docker_archive([tar], str(d / 'img.tar'))}", ref)
    return {"src": src, "paths": paths, "ref": ref}


class _Mount:
    def __init__(self, ref: str, where, cache):
        self.dir = str(where)
        os.makedirs(self.dir)
        lazybuild("mount", "--daemon", "--no-background-fetch", ref, self.dir, "--cache", str(cache))

    def close(self) -> None:
        lazybuild("umount", self.dir)
        for _ in range(100):
            with open("/proc/self/mountinfo") as f:
                if not any(line.split()[4] == os.path.realpath(self.dir) for line in f):
                    return
            time.sleep(0.05)


def _mounted_via(proxy: SlowProxy, small_files, tmp_path) -> _Mount:
    return _Mount(small_files["ref"].replace(small_files["ref"].split("/")[0], proxy.host), tmp_path / "mnt",
                  tmp_path / "cache")


def _diff(src: str, mnt: str) -> None:
    landmarks = ["-x", ".no.prefetch.landmark", "-x", ".prefetch.landmark"]  # the layer's own marker files
    p = subprocess.run(["diff", "-r", *landmarks, src, mnt], capture_output=True, text=True, timeout=DIFF_TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def _read_concurrently(src: str, mnt: str, paths: list[str], threads: int = 16) -> None:
    """Read every file from `threads` readers at once, in an order that jumps across the layer (so
    readers miss in different windows at the same time), and compare with the source."""
    order = [paths[(i * 97) % len(paths)] for i in range(len(paths))]

    def one(rel: str) -> str | None:
        with open(os.path.join(mnt, rel), "rb") as a, open(os.path.join(src, rel), "rb") as b:
            return None if a.read() == b.read() else rel

    with ThreadPoolExecutor(threads) as pool:
        wrong = [r for r in pool.map(one, order, timeout=DIFF_TIMEOUT_S) if r]
    assert not wrong, wrong[:5]


def test_diff_of_many_small_files_over_a_slow_link(registry, small_files, tmp_path):
    """0.3 s per blob answer: one request per file would take 15 minutes; one per window takes seconds."""
    proxy = SlowProxy(registry.host, delay_s=0.3)
    try:
        m = _mounted_via(proxy, small_files, tmp_path)
        try:
            _diff(small_files["src"], m.dir)
        finally:
            m.close()
        gets = proxy.blob_gets()
        print(f"\n{FILES} files: {len(gets)} blob requests, {proxy.blob_bytes_sent} bytes")
        assert len(gets) <= FILES // 20, len(gets)
    finally:
        proxy.stop()


def test_diff_of_many_small_files_with_every_third_request_failing(registry, small_files, tmp_path):
    """503 on every third request: each is retried at once, on another connection, and the tree reads back."""
    proxy = SlowProxy(registry.host, fail_every=3)
    try:
        m = _mounted_via(proxy, small_files, tmp_path)
        try:
            _diff(small_files["src"], m.dir)
        finally:
            m.close()
        with proxy.lock:
            seen = list(proxy.seen)
        failed = [i for i, s in enumerate(seen) if s.status == 503]
        gets = [s for s in seen if s.is_blob_get and s.status != 503]
        print(f"\n{FILES} files: {len(gets)} answered blob requests, {len(failed)} answered 503")
        assert failed and len(gets) <= FILES // 20, (len(failed), len(gets))
        for i in failed:  # the retry of a 503 went out on another connection
            retry = next((s for s in seen[i + 1:] if (s.method, s.path, s.range) ==
                          (seen[i].method, seen[i].path, seen[i].range)), None)
            assert retry is not None and retry.client_port != seen[i].client_port, (seen[i], retry)
    finally:
        proxy.stop()


def test_concurrent_reads_from_a_registry_that_refuses_multirange(registry, small_files, tmp_path):
    """Misses of concurrent readers go out together as a multi-range request; a registry answering those
    with 400 is asked once, remembered, and then asked for each range on its own, in parallel."""
    proxy = SlowProxy(registry.host, delay_s=0.2, reject_multirange=True)
    try:
        m = _mounted_via(proxy, small_files, tmp_path)
        try:
            _read_concurrently(small_files["src"], m.dir, small_files["paths"])
            _diff(small_files["src"], m.dir)
        finally:
            m.close()
        gets = proxy.blob_gets()
        refused = [s for s in gets if s.status == 400]
        print(f"\n{FILES} files: {len(gets)} blob requests, {len(refused)} refused multi-range")
        # Each of the requests in flight when the first refusal came may be refused too, no more.
        assert 1 <= len(refused) <= 4, len(refused)
        assert len(gets) <= FILES // 10, len(gets)
    finally:
        proxy.stop()


def test_range_reads_retry_and_fall_back_on_a_real_registry(registry, tmp_path):
    """The registry client under the mount: a body cut off mid-way is asked for again; a refused
    multi-range request is asked once, then ranges go one per request."""
    data = os.urandom(12 << 20)
    digest = sha256_digest(data)
    with Registry(registry.host) as reg:
        reg.push_blob("engine/blob", digest, len(data), lambda: io.BytesIO(data))
    ranges = [(i * 300_000, i * 300_000 + 5000) for i in range(10)]
    want = [data[a:b] for a, b in ranges]

    proxy = SlowProxy(registry.host, drop_every=2)
    try:
        with Registry(proxy.host, backoff_s=0.01) as reg:
            for _ in range(4):
                assert reg.read_ranges("engine/blob", digest, ranges) == want
        assert proxy.dropped >= 2
    finally:
        proxy.stop()

    proxy = SlowProxy(registry.host, reject_multirange=True)
    try:
        with Registry(proxy.host, backoff_s=0.01) as reg:
            assert reg.read_ranges("engine/blob", digest, ranges) == want
            assert reg.read_ranges("engine/blob", digest, ranges[:3]) == want[:3]
        gets = proxy.blob_gets()
        assert [s.ranges for s in gets if s.status == 400] == [10]  # asked once, then remembered
        assert sorted(s.ranges for s in gets if s.status == 206) == [1] * 13
    finally:
        proxy.stop()

    # Ranges far apart go in separate requests (each answer is held before it is verified: its size is
    # bounded by its own span), in parallel, and come back in the order asked.
    proxy = SlowProxy(registry.host)
    try:
        far = [(11 << 20, (11 << 20) + 100), (0, 100), (100_000, 100_100), (6 << 20, (6 << 20) + 100)]
        with Registry(proxy.host) as reg:
            assert reg.read_ranges("engine/blob", digest, far) == [data[a:b] for a, b in far]
        assert sorted(s.ranges for s in proxy.blob_gets()) == [1, 1, 2]
    finally:
        proxy.stop()
