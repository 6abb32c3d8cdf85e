"""The snapshotter's semantics under concurrency, without containerd, FUSE or a registry: lazy layers are
stood in for by LayersInHand, which opens a layer only when the test lets it. (The same under containerd,
FUSE and a registry: integration/test_snapshotter.py.)"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from lazybuild.snapshotter.remote import REF_LABEL, STARGZ_DIGEST, STARGZ_REF, TOC_LABEL
from lazybuild.snapshotter.snapshots import Snapshotter
from lazybuild.snapshotter.store import SnapshotError

REF = "127.0.0.1:5000/app:esgz"
DIGESTS = ["sha256:" + c * 64 for c in "abc"]
TOC = "sha256:" + "d" * 64


def labels(chain: str, digest: str) -> dict[str, str]:
    return {REF_LABEL: chain, STARGZ_REF: REF, STARGZ_DIGEST: digest, TOC_LABEL: TOC}


@dataclass
class Stats:
    size: int = 1000


@dataclass
class Fetched:
    digest: str
    stats: Stats


class LayersInHand:
    """What Snapshotter uses of LazyLayers. Fetching and re-opening a layer wait for `go`, so a test
    can look at everything else while they are under way."""

    def __init__(self):
        self.go = threading.Event()
        self.tree: set[str] = set()
        self.unavailable: dict[int, str] = {}
        self.fetches: list[str] = []
        self.reopened: list[int] = []
        self.lock = threading.Lock()

    def path(self, sid: int) -> str:
        return f"/lazy/{sid}"

    def fetch_verified(self, source) -> Fetched:
        with self.lock:
            self.fetches.append(source.digest)
        assert self.go.wait(30)
        return Fetched(source.digest, Stats())

    def attach(self, sid: int, fetched) -> None:
        self.tree.add(str(sid))

    def restore(self, sid: int, remote: dict) -> bool:
        with self.lock:
            self.reopened.append(sid)
        assert self.go.wait(30)
        self.tree.add(str(sid))
        return True

    def detach(self, sid: int) -> None:
        self.tree.discard(str(sid))


def in_threads(n: int, fn) -> tuple[list[threading.Thread], list]:
    results: list = []

    def run(i):
        try:
            results.append(fn(i))
        except Exception as e:  # noqa: BLE001 - the test looks at what each call raised
            results.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def wait_until(pred) -> None:
    deadline = threading.Event()
    for _ in range(3000):
        if pred():
            return
        deadline.wait(0.01)
    raise AssertionError("timed out")


def test_concurrent_prepares_of_the_same_and_of_different_layers(tmp_path):
    """8 clients pulling one image at once: 8 Prepares of each of two layers. Each layer is fetched once,
    the two layers at the same time, and every Prepare answers that the layer is served lazily."""
    lazy = LayersInHand()
    sn = Snapshotter(str(tmp_path), lazy)
    threads, results = in_threads(16, lambda i: sn.prepare(f"extract-{i}", "", labels(f"chain-{i % 2}", DIGESTS[i % 2])))
    wait_until(lambda: sorted(lazy.fetches) == DIGESTS[:2])  # both under way at once, neither twice
    lazy.go.set()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert all(isinstance(r, SnapshotError) and r.code == "already_exists" for r in results), results
    assert sorted(lazy.fetches) == DIGESTS[:2]
    committed = {s.key: s for s in sn.list([])}
    assert sorted(committed) == ["chain-0", "chain-1"]
    assert all(s.remote and s.remote["digest"] in DIGESTS for s in committed.values())
    assert sorted(lazy.tree) == sorted(str(s.id) for s in committed.values())
    sn.close()


def test_restart_serves_requests_while_layers_reopen(tmp_path):
    """After a restart the store is served at once; a request that needs a lazy layer's directory waits
    for the mount, then for the layer, which is re-opened once whoever asks first."""
    first = LayersInHand()
    first.go.set()
    sn = Snapshotter(str(tmp_path), first)
    with pytest.raises(SnapshotError):
        sn.prepare("x0", "", labels("base", DIGESTS[0]))
    with pytest.raises(SnapshotError):
        sn.prepare("x1", "base", labels("top", DIGESTS[1]))
    sn.prepare("container", "top", {})
    sn.close()

    lazy = LayersInHand()
    mounted = threading.Event()
    sn = Snapshotter(str(tmp_path), lazy, mounted)
    restoring = threading.Thread(target=sn.restore)
    restoring.start()
    # served while nothing is mounted or re-opened yet
    assert sn.stat("top").remote is not None
    assert sorted(s.key for s in sn.list([])) == ["base", "container", "top"]
    threads, results = in_threads(4, lambda i: sn.mounts("container"))
    mounted.set()
    wait_until(lambda: lazy.reopened)
    threads[0].join(0.2)
    assert all(t.is_alive() for t in threads)  # waiting for the layers
    lazy.go.set()
    for t in threads + [restoring]:
        t.join()
    ids = {s.key: s.id for s in sn.list([])}
    assert sorted(lazy.reopened) == sorted([ids["base"], ids["top"]])  # each once
    for mounts in results:
        assert len(mounts) == 1 and mounts[0].type == "overlay", mounts
        assert f"lowerdir=/lazy/{ids['top']}:/lazy/{ids['base']}" in mounts[0].options
    sn.close()


def test_a_layer_removed_while_reopening_is_not_served(tmp_path):
    first = LayersInHand()
    first.go.set()
    sn = Snapshotter(str(tmp_path), first)
    with pytest.raises(SnapshotError):
        sn.prepare("x0", "", labels("base", DIGESTS[0]))
    sn.close()

    lazy = LayersInHand()
    sn = Snapshotter(str(tmp_path), lazy)
    restoring = threading.Thread(target=sn.restore)
    restoring.start()
    wait_until(lambda: lazy.reopened)
    remover = threading.Thread(target=sn.remove, args=("base",))
    remover.start()
    lazy.go.set()
    for t in (restoring, remover):
        t.join()
    assert not lazy.tree  # detached after the re-opening that was under way
    assert sn.list([]) == []
    sn.close()


def test_neighbours_are_fetched_ahead_unless_already_served(tmp_path):
    """A Prepare starts the image's other layers; a layer already served (a base shared with an image pulled
    before) gets no Prepare that would take its fetch, so it is not fetched ahead (it would be kept for
    nothing)."""
    from lazybuild.snapshotter.config import Config
    from lazybuild.snapshotter.remote import LayerSource, LazyLayers

    class Unparsable(Fetched):
        def build(self, cache):
            raise ValueError("not a TOC")  # attach() then marks the layer failed; it still counts as served

    lazy = LazyLayers(str(tmp_path), Config(prefetch=False, background_fetch=False))
    fetched: list[str] = []

    def fetch(source):
        fetched.append(source.digest)
        return Unparsable(source.digest, Stats())
    lazy._fetch = fetch
    try:
        lazy.attach(1, Unparsable(DIGESTS[0], Stats()), wait=True)
        got = lazy.fetch(LayerSource(REF, DIGESTS[1], TOC, [DIGESTS[0], DIGESTS[2]]))
        assert got.digest == DIGESTS[1]
        lazy.attach(2, got, wait=True)  # as Prepare does
        got = lazy.fetch(LayerSource(REF, DIGESTS[2], TOC, [DIGESTS[0], DIGESTS[1]]))  # taken from ahead
        assert got.digest == DIGESTS[2]
        assert sorted(fetched) == sorted(DIGESTS[1:])
    finally:
        lazy.close()
