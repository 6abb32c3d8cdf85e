"""Hostile inputs against the mounter's chunk cache and the snapshotter's labels (issue 14).

Real FUSE, a real docker-registry and a real `lazybuild snapshotter`; evil images are eStargz layers
whose TOC (and TOC digest annotation, which the image author also writes) name host paths as digests.
Every attack aims at the `canary` tree, which must come out untouched; the refusal may come from the
TOC parser or from the stores themselves, so the tests check for a clear error or EIO, not who said it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

import grpc
import pytest

from lazybuild.testing.images import docker_archive
from support.cli_runner import lazybuild
from support.containerd import Snapshotter, lazybuild_mounts
from support.evil_keys import old_cache_path
from support.registry import FaultProxy

from lazybuild import estargz
from lazybuild.digest import sha256_digest
from lazybuild.estargz import FileBlob, LayerReader
from lazybuild.estargz import compression as comp
from lazybuild.mounter import ChunkCache
from lazybuild.mounter.mount import status_path
from lazybuild.snapshotter import remote

REF = remote.REF_LABEL


# --- evil images --------------------------------------------------------------------------------------------

def _tar(path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return str(path)


class _Sink:
    def __init__(self):
        self.out = io.BytesIO()

    def write(self, data):
        self.out.write(data)

    def add_raw(self, data):
        pass


def estargz_layer(tmp_path, name: str, files: dict[str, bytes], edit=None, **options) -> dict:
    """An eStargz blob of `files`; `edit(entries)` rewrites its TOC entries (the blob's TOC and the
    annotation then agree, as an evil author would make them). Returns the blob path and descriptor facts."""
    out = tmp_path / f"{name}.esgz"
    with open(out, "wb") as f:
        built = estargz.build(_tar(tmp_path / f"{name}.tar", files), f, **options)
    if edit is None:
        return {"path": str(out), "digest": built.digest, "size": built.size, "toc": built.toc_digest,
                "diff_id": built.diff_id, "media_type": built.media_type}
    with FileBlob(str(out)) as blob:
        kind, toc_offset, raw = LayerReader.fetch_toc(blob)
    assert kind == "gzip"
    doc = json.loads(raw)
    edit(doc["entries"])
    new_toc = json.dumps(doc, indent="\t").encode()
    sink = _Sink()
    with open(out, "rb") as f:
        sink.write(f.read(toc_offset))
    comp.Gzip().write_trailer(sink, toc_offset, [new_toc])
    data = sink.out.getvalue()
    with open(out, "wb") as f:
        f.write(data)
    return {"path": str(out), "digest": sha256_digest(data), "size": len(data), "toc": sha256_digest(new_toc),
            "diff_id": sha256_digest(gzip.decompress(data)), "media_type": built.media_type}


def push_layer(tmp_path, layer: dict, ref: str) -> None:
    """A one-layer image from an OCI layout, the layer annotated with its TOC digest."""
    from lazybuild.image import OCI_CONFIG, Descriptor, Manifest
    from lazybuild.layout import OCILayout

    layout = OCILayout(str(tmp_path / f"layout-{layer['digest'][7:19]}"), create=True)
    layout.adopt_blob(layer["digest"], layer["path"])
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"]]}}).encode()
    manifest = Manifest.build(Descriptor(OCI_CONFIG, layout.put_bytes(config), len(config)),
                              [Descriptor(layer["media_type"], layer["digest"], layer["size"],
                                          {estargz.TOC_DIGEST_ANNOTATION: layer["toc"]})])
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), "t")
    lazybuild("push", f"oci:{layout.root}:t", ref)


def _mounted(path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def umount(path) -> None:
    lazybuild("umount", str(path))
    for _ in range(100):
        if not _mounted(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} still mounted")


def read_with_timeout(path: str, timeout_s: float = 60) -> tuple[int, bytes, str]:
    """`cat path` in a child (a read that hangs in FUSE fails the test instead of hanging it)."""
    try:
        r = subprocess.run(["cat", path], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"reading {path} hung for {timeout_s:.0f} s") from None
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def mount_log(mountpoint) -> str:
    with open(status_path(str(mountpoint)).replace(".json", ".log")) as f:
        return f.read()


# --- (a) chunk digests that name host paths -----------------------------------------------------------------

def test_evil_chunk_digests_never_touch_the_host(registry, canary, tmp_path):
    cache = tmp_path / "cache"
    decoy = tmp_path / "decoy"  # outside the canary too: what the old code would have opened and unlinked
    decoy.write_text("decoy\n")
    evil = {
        "abs-victim": "sha256:" + canary.victim,  # os.path.join(root, "/x") is "/x"
        "rel-secret": old_cache_path(str(cache), canary.secret),
        "rel-decoy": old_cache_path(str(cache), str(decoy)),
    }

    def edit(entries):
        for e in entries:
            if e["name"] in evil:
                e["chunkDigest"] = evil[e["name"]]
            if e["name"] == "whole-digest":  # no chunkDigest: the key falls back to the file's digest
                e.pop("chunkDigest", None)
                e["digest"] = "sha256:" + canary.writable_dir + "/keep"

    files = {n: f"payload of {n}\n".encode() * 50 for n in [*evil, "whole-digest", "fine"]}
    layer = estargz_layer(tmp_path, "evil", files, edit)
    ref = f"{registry.host}/hostile/evil-chunks:esgz"
    push_layer(tmp_path, layer, ref)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(cache), "--no-background-fetch", ok=False)
    if r.returncode != 0:  # refused at open: a clear error, not a traceback
        assert "digest" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
        assert not _mounted(mnt)
    else:
        try:
            for name in [*evil, "whole-digest"]:
                rc, out, err = read_with_timeout(str(mnt / name))
                assert rc != 0 and out == b"" and "Input/output error" in err, (name, rc, out, err)
        finally:
            umount(mnt)
    assert decoy.read_text() == "decoy\n"
    # nothing was written beside the cache either (the `canary` fixture checks the canary itself)
    assert set(os.listdir(tmp_path)) <= {"cache", "decoy", "mnt", "evil.esgz", "evil.tar",
                                         f"layout-{layer['digest'][7:19]}"}


# --- (b) a full cache disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "small-cache"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_cache_disk_serves_verified_bytes_without_hanging(registry, small_tmpfs, canary, tmp_path):
    # 16 files of 96 KiB random bytes (incompressible): 1.5 MiB of chunks for a 256 KiB cache disk.
    # The first files are prioritized, so the prefetch stream stores into the full disk too (where a
    # failed store used to leave its chunk's lock held and every later reader blocked forever).
    files = {f"d/f{i:02d}": os.urandom(96 << 10) for i in range(16)}
    prio = tmp_path / "prio.txt"
    prio.write_text("".join(f"d/f{i:02d}\n" for i in range(8)))
    ref = f"{registry.host}/hostile/full-cache:esgz"
    archive = docker_archive([_tar(tmp_path / "full.tar", files)], str(tmp_path / "img.tar"))
    lazybuild("convert", f"docker-archive:{archive}", ref, "--chunk-size", "32KiB", "--prioritized-files", str(prio))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(small_tmpfs))
    try:
        for name in sorted(files, reverse=True):  # the unprioritized ones first: the prefetch still streams
            rc, out, err = read_with_timeout(str(mnt / name))
            assert rc == 0 and out == files[name], (name, rc, len(out), err)
        log = mount_log(mnt)
        assert log.count("cannot keep chunks") == 1, log
        assert "No space left on device" in log
    finally:
        umount(mnt)


# --- (c) a chunk cache written by a process that was killed --------------------------------------------------

def test_partial_chunk_files_are_never_served(registry, tmp_path):
    files = {"a.bin": os.urandom(200 << 10), "b.bin": os.urandom(50 << 10)}
    layer = estargz_layer(tmp_path, "partial", files, chunk_size=64 << 10)
    with FileBlob(layer["path"]) as blob:
        reader = LayerReader(blob)
        chunks = reader.chunks["a.bin"]
        plain = [reader.read_chunk(c) for c in chunks]
    ref = f"{registry.host}/hostile/partial:esgz"
    push_layer(tmp_path, layer, ref)  # (moves the blob into the layout)
    cache = ChunkCache(str(tmp_path / "cache"))
    # chunk 0: cut short under its final name (what a non-atomic writer killed midway would leave)
    p0 = cache.path(chunks[0].chunk_digest)
    os.makedirs(os.path.dirname(p0), exist_ok=True)
    with open(p0, "wb") as f:
        f.write(plain[0][: len(plain[0]) // 2])
    # chunk 1: right length, wrong bytes (a torn write, bit rot)
    p1 = cache.path(chunks[1].chunk_digest)
    os.makedirs(os.path.dirname(p1), exist_ok=True)
    with open(p1, "wb") as f:
        f.write(b"\0" * len(plain[1]))
    # a writer killed before its rename left a temporary file: old ones are removed at start
    stale = os.path.join(os.path.dirname(p1), ".tmp-killed")
    with open(stale, "wb") as f:
        f.write(plain[1][:100])
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(tmp_path / "cache"), "--no-background-fetch",
              "--no-prefetch")
    try:
        rc, out, err = read_with_timeout(str(mnt / "a.bin"))
        assert rc == 0 and out == files["a.bin"], err
        rc, out, err = read_with_timeout(str(mnt / "b.bin"))
        assert rc == 0 and out == files["b.bin"], err
    finally:
        umount(mnt)
    assert not os.path.exists(stale)
    for path, want in ((p0, plain[0]), (p1, plain[1])):  # replaced by the verified chunk
        with open(path, "rb") as f:
            assert f.read() == want
    leftovers = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.startswith(".tmp-")]
    assert not leftovers


# --- (d) the snapshotter's Prepare labels ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def snapshotter(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-sn")
    sn = Snapshotter(str(d / "sn"))
    os.makedirs(sn.workdir)
    sn.start()
    channel = grpc.insecure_channel("unix://" + sn.sock)
    from lazybuild.snapshotter.proto import snapshots_pb2_grpc

    sn.api = snapshots_pb2_grpc.SnapshotsStub(channel)
    yield sn
    channel.close()
    sn.stop()
    assert not lazybuild_mounts(sn.root), "the snapshotter left mounts behind"


def prepare(sn, key: str, labels: dict[str, str], parent: str = ""):
    from lazybuild.snapshotter.proto import snapshots_pb2

    return sn.api.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="lazybuild", key=key, parent=parent,
                                                               labels=labels), timeout=120)


def remove(sn, key: str) -> None:
    from lazybuild.snapshotter.proto import snapshots_pb2

    sn.api.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter="lazybuild", key=key), timeout=60)


def cleanup(sn) -> None:
    from lazybuild.snapshotter.proto import snapshots_pb2

    sn.api.Cleanup(snapshots_pb2.CleanupRequest(snapshotter="lazybuild"), timeout=60)


def root_tree(root: str) -> set[str]:
    """Every path under the snapshotter root but its FUSE mount and its own status/database files."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        if dirpath == root:
            dirs[:] = [d for d in dirs if d != "fuse"]
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not (rel.startswith("metadata.db") or rel in ("status.json", ".status.json.tmp")):
                out.add(rel)
    return out


def _chain(n: int) -> str:
    return "sha256:" + hashlib.sha256(f"chain {n} {time.time()}".encode()).hexdigest()


@pytest.fixture(scope="module")
def good_layer(registry, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("good-layer")
    layer = estargz_layer(d, "good", {"hello.txt": b"hello from a good layer\n"})
    layer["ref"] = f"{registry.host}/hostile/good:esgz"
    push_layer(d, layer, layer["ref"])
    return layer


def test_prepare_refuses_evil_digest_labels(snapshotter, good_layer, canary):
    sn = snapshotter
    good = {REF: "", remote.STARGZ_REF: good_layer["ref"], remote.STARGZ_DIGEST: good_layer["digest"],
            remote.STARGZ_LAYERS: good_layer["digest"], remote.TOC_LABEL: good_layer["toc"]}
    tocs = os.path.join(sn.root, "tocs")
    rel_victim = "sha256:" + os.path.relpath(canary.victim, tocs)
    cases = [
        (remote.STARGZ_DIGEST, "sha256:" + canary.victim),
        (remote.STARGZ_DIGEST, rel_victim),
        (remote.STARGZ_DIGEST, "sha256:../../../" + canary.rel_from(sn.root)),
        (remote.STARGZ_LAYERS, good_layer["digest"] + "," + rel_victim),
        (remote.STARGZ_LAYERS, good_layer["digest"] + ",,"),
        (remote.TOC_LABEL, "sha256:" + canary.secret),
        (remote.CRI_DIGEST, rel_victim),
        (remote.CRI_LAYERS, "sha256:" + canary.writable_dir),
        (remote.STARGZ_REF, "user:pass@evil.example/x:latest"),
        (remote.STARGZ_REF, f"{good_layer['ref']}\n"),
        (remote.CRI_REF, "evil.example/x/../../y:latest"),
    ]
    before = root_tree(sn.root)
    for i, (label, value) in enumerate(cases):
        labels = {**good, REF: _chain(i), label: value}
        with pytest.raises(grpc.RpcError) as e:
            prepare(sn, f"extract-evil-{i}", labels)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, value, e.value.details())
        assert label in e.value.details(), e.value.details()
        assert root_tree(sn.root) == before, (label, value, root_tree(sn.root) - before)
    cleanup(sn)
    assert root_tree(sn.root) == before


def test_evil_toc_behind_valid_labels_gives_eio(snapshotter, registry, canary, tmp_path):
    """Labels that are fine, a layer whose (digest-matching) TOC names host paths: served as EIO or
    downloaded by containerd, never a host file opened or removed, also not by Cleanup afterwards."""
    sn = snapshotter
    cache = os.path.join(sn.root, "cache")

    def edit(entries):
        for e in entries:
            if e["name"] == "victim":
                e["chunkDigest"] = "sha256:" + canary.victim
            if e["name"] == "secret":
                e["chunkDigest"] = old_cache_path(cache, canary.secret)

    layer = estargz_layer(tmp_path, "evil-sn", {"victim": b"v" * 1000, "secret": b"s" * 1000}, edit)
    ref = f"{registry.host}/hostile/evil-sn:esgz"
    push_layer(tmp_path, layer, ref)
    chain = _chain(100)
    labels = {REF: chain, remote.STARGZ_REF: ref, remote.STARGZ_DIGEST: layer["digest"],
              remote.STARGZ_LAYERS: layer["digest"], remote.TOC_LABEL: layer["toc"]}
    fuse_before = set(os.listdir(os.path.join(sn.root, "fuse")))
    try:
        prepare(sn, "extract-evil-toc", labels)
        remove(sn, "extract-evil-toc")  # not served lazily: containerd would download it
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e.details()
        new = set(os.listdir(os.path.join(sn.root, "fuse"))) - fuse_before
        assert len(new) == 1
        sid = new.pop()
        for name in ("victim", "secret"):
            rc, out, err = read_with_timeout(os.path.join(sn.root, "fuse", sid, name))
            assert rc != 0 and out == b"" and "Input/output error" in err, (name, rc, err)
        unavailable = sn.status()["unavailable"]
        assert any("digest" in why for why in unavailable.values()), unavailable
        remove(sn, chain)
    cleanup(sn)


def test_cleanup_never_deletes_by_unchecked_kept_names(snapshotter, canary):
    """A kept chunk list or tocs entry that names host paths (an older version, a hand edit): Cleanup
    ignores those keys, leaves names it did not make, and never follows a symlink out."""
    sn = snapshotter
    tocs = os.path.join(sn.root, "tocs")
    cache = os.path.join(sn.root, "cache")
    os.makedirs(tocs, exist_ok=True)
    gone = os.path.join(tocs, "sha256-" + "e" * 64)
    os.makedirs(gone)
    with open(os.path.join(gone, "chunks"), "w") as f:
        f.write("\n".join(["sha256:" + canary.victim, old_cache_path(cache, canary.secret),
                           "sha256:" + "0" * 64]))
    stray = os.path.join(tocs, "sha256-..")
    os.makedirs(stray)
    link = os.path.join(tocs, "sha256-" + "f" * 64)
    os.symlink(canary.writable_dir, link)
    try:
        cleanup(sn)
        assert not os.path.exists(gone)  # a kept TOC of no snapshot: removed, by its checked name
        assert os.path.isdir(stray) and os.path.islink(link)  # not ours: left (and reported)
        assert "not a kept TOC this snapshotter made" in sn.logs()
        assert "not digests" in sn.logs()
    finally:
        os.rmdir(stray)
        os.unlink(link)


def test_cri_labels_choose_the_registry_not_the_image(snapshotter, good_layer, registry):
    """Under CRI an image's own `containerd.io/snapshot/remote/stargz.*` annotations reach the Prepare
    too. CRI's labels (set from the kubelet's pull) win: the registry the image names is never asked."""
    sn = snapshotter
    elsewhere = FaultProxy(registry.host)  # a registry of the image author's choosing; it records requests
    try:
        evil_ref = good_layer["ref"].replace(registry.host, elsewhere.host)
        image_says = {remote.STARGZ_REF: evil_ref, remote.STARGZ_DIGEST: good_layer["digest"],
                      remote.STARGZ_LAYERS: good_layer["digest"], remote.TOC_LABEL: good_layer["toc"]}
        cri = {remote.CRI_REF: good_layer["ref"], remote.CRI_DIGEST: good_layer["digest"],
               remote.CRI_LAYERS: good_layer["digest"]}
        chain = _chain(200)
        with pytest.raises(grpc.RpcError) as e:
            prepare(sn, "extract-cri", {REF: chain, **image_says, **cri})
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()  # served lazily, from CRI's
        # CRI's reference without its layer digest: not lazy (containerd downloads), and still not elsewhere
        chain2 = _chain(201)
        reply = prepare(sn, "extract-cri-partial", {REF: chain2, **image_says, remote.CRI_REF: good_layer["ref"]})
        assert reply.mounts
        remove(sn, "extract-cri-partial")
        assert elsewhere.requests == []
        # without CRI labels the stargz ones are used (ctr-remote, nerdctl): that host is asked (whether it
        # then serves the layer lazily or containerd downloads it does not matter here)
        chain3 = _chain(202)
        try:
            prepare(sn, "extract-stargz", {REF: chain3, **image_says})
            remove(sn, "extract-stargz")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e.details()
            remove(sn, chain3)
        assert elsewhere.requests
        remove(sn, chain)
    finally:
        elsewhere.stop()
    cleanup(sn)


def test_snapshotter_on_a_full_cache_disk_serves_verified_bytes(registry, small_tmpfs, tmp_path):
    """The same full disk under the snapshotter (cache_dir on the 256k tmpfs): the prefetch and the reads
    of a lazy layer store into it and fail; every file still reads right, nothing hangs, one warning."""
    files = {f"f{i:02d}": os.urandom(96 << 10) for i in range(12)}
    layer = estargz_layer(tmp_path, "full-sn", files, chunk_size=32 << 10,
                          prioritized_files=[f"f{i:02d}" for i in range(6)])
    ref = f"{registry.host}/hostile/full-sn:esgz"
    push_layer(tmp_path, layer, ref)
    sn = Snapshotter(str(tmp_path / "sn"))
    os.makedirs(sn.workdir)
    with open(os.path.join(sn.workdir, "config.toml"), "w") as f:
        f.write(f'cache_dir = "{small_tmpfs}"\nbackground_fetch = false\n')
    sn.config = os.path.join(sn.workdir, "config.toml")
    sn.start()
    channel = grpc.insecure_channel("unix://" + sn.sock)
    try:
        from lazybuild.snapshotter.proto import snapshots_pb2_grpc

        sn.api = snapshots_pb2_grpc.SnapshotsStub(channel)
        chain = _chain(300)
        with pytest.raises(grpc.RpcError) as e:
            prepare(sn, "extract-full", {REF: chain, remote.STARGZ_REF: ref, remote.STARGZ_DIGEST: layer["digest"],
                                         remote.STARGZ_LAYERS: layer["digest"], remote.TOC_LABEL: layer["toc"]})
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
        (sid,) = os.listdir(os.path.join(sn.root, "fuse"))
        for name in sorted(files, reverse=True):
            rc, out, err = read_with_timeout(os.path.join(sn.root, "fuse", sid, name))
            assert rc == 0 and out == files[name], (name, rc, len(out), err)
        assert sn.logs().count("cannot keep chunks") == 1, sn.logs()
        remove(sn, chain)
    finally:
        channel.close()
        sn.stop()
    assert not lazybuild_mounts(sn.root)
