"""`lazybuild snapshotter` as containerd's proxy snapshotter, against real containerd 1.6 + runc and the
reference client ctr-remote: lazy rpull + run, the download fallback, restart, cleanup, the API itself."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile

import pytest

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess
from support.containerd import Containerd, Snapshotter, lazybuild_mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containerd, FUSE and overlayfs need root")
LAZYBUILD = [sys.executable, "-I", "-m", "lazybuild.cli"]


def lazybuild(*args: str) -> str:
    r = subprocess.run(LAZYBUILD + list(args), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return r.stdout


def top_layer(path: str) -> str:
    """A small second layer: a new file and a whiteout of /etc/motd."""
    with tarfile.open(path, "w") as tf:
        for name, data in (("hello.txt", b"hello from the top layer\n"), ("etc/.wh.motd", b"")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One registry holding the same 2-layer python3 image as gzip (:legacy) and eStargz (:esgz)."""
    d = tmp_path_factory.mktemp("sn-images")
    reg = RegistryProcess(str(d / "registry"))
    rootfs = debootstrap_rootfs(("python3", "python3-venv"))
    archive = docker_archive([rootfs, top_layer(str(d / "top.tar"))], str(d / "img.tar"), cmd=["python3", "-c", "print(1)"])
    lazybuild("push", "docker-archive:" + archive, f"{reg.host}/sn/py:legacy")
    lazybuild("convert", f"{reg.host}/sn/py:legacy", f"{reg.host}/sn/py:esgz")
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("sn-daemons")
    sn = Snapshotter(str(d / "snapshotter"))
    os.makedirs(sn.workdir)
    sn.start()
    os.makedirs(d / "containerd")
    ctd = Containerd(str(d / "containerd"), sn.sock)
    yield sn, ctd
    ctd.stop()
    sn.stop()
    assert not lazybuild_mounts(sn.root), "the snapshotter left mounts behind"


def registry_gets(reg: RegistryProcess, digest: str) -> list[tuple[str, int]]:
    """(status, bytes) of each GET of blob `digest` in the registry's access log."""
    with open(os.path.join(os.path.dirname(reg.log.name), "registry.log")) as f:
        text = f.read()
    return [(m.group(1), int(m.group(2))) for m in
            re.finditer(r'"GET /v2/[^ ]*/blobs/' + re.escape(digest) + r' HTTP/[0-9.]+" (\d{3}) (\d+)', text)]


def layer_digests(ref: str) -> list[str]:
    import json

    return [layer["digest"] for layer in json.loads(lazybuild("inspect", "--format", "json", ref))["manifest"]["layers"]]


def run(ctd: Containerd, ref: str, name: str, *cmd: str) -> str:
    r = ctd.ctr("run", "--rm", "--net-host", "--snapshotter", "lazybuild", ref, name, *cmd, timeout=120)
    return r.stdout


def test_rpull_mounts_layers_lazily_and_runs(daemons, images):
    sn, ctd = daemons
    ref = f"{images.host}/sn/py:esgz"
    ctd.ctr_remote("images", "rpull", "--snapshotter", "lazybuild", "--plain-http", ref)
    wait(lambda: len(sn.status()["layers"]) == 2, "both layers to be built")
    status = sn.status()
    digests = layer_digests(ref)
    assert sorted(l["digest"] for l in status["layers"].values()) == sorted(digests)
    assert all(l["lazy"] for l in status["layers"].values())
    kinds = ctd.ctr("snapshots", "--snapshotter", "lazybuild", "ls").stdout
    assert kinds.count("Committed") == 2

    assert run(ctd, ref, "py1", "python3", "-c", "print(1)").strip() == "1"
    out = run(ctd, ref, "py2", "sh", "-c", "cat /hello.txt; test -e /etc/motd || echo motd-gone; ls /etc/os-release")
    assert out.split("\n")[:3] == ["hello from the top layer", "motd-gone", "/etc/os-release"]

    # the big layer was never downloaded whole: only ranged reads, a small part of it
    big = max(sn.status()["layers"].values(), key=lambda l: l["size"])
    assert big["fetchedBytes"] < 0.3 * big["size"], big
    gets = registry_gets(images, big["digest"])
    assert gets and all(status == "206" for status, _ in gets), gets
    assert sum(n for _, n in gets) < 0.3 * big["size"]


def test_plain_pull_goes_through_download_and_unpack(daemons, images):
    """`ctr images pull` passes no image labels: containerd downloads and unpacks into our overlay snapshots;
    a labelled layer that is not eStargz (ctr-remote rpull of the gzip image) falls back the same way."""
    sn, ctd = daemons
    legacy = f"{images.host}/sn/py:legacy"
    ctd.ctr("images", "pull", "--snapshotter", "lazybuild", "--plain-http", legacy)
    assert run(ctd, legacy, "legacy1", "sh", "-c", "python3 -c 'print(1)'; cat /hello.txt").split("\n")[:2] == \
        ["1", "hello from the top layer"]
    ctd.ctr("images", "rm", "--sync", legacy)
    ctd.ctr_remote("images", "rpull", "--snapshotter", "lazybuild", "--plain-http", legacy)
    assert run(ctd, legacy, "legacy2", "python3", "-c", "print(2)").strip() == "2"
    assert "downloaded by containerd" in sn.logs()
    lazy_digests = {l["digest"] for l in sn.status()["layers"].values()}
    assert not lazy_digests & set(layer_digests(legacy))
    ctd.ctr("images", "rm", "--sync", legacy)


def test_snapshot_api_through_ctr(daemons):
    """Prepare / commit / view / usage / labels / list filters / remove, as `ctr snapshots` drives them."""
    sn, ctd = daemons
    s = ["snapshots", "--snapshotter", "lazybuild"]
    mounts = ctd.ctr(*s, "prepare", "--mounts", "t-base").stdout
    assert "bind" in mounts and "rw" in mounts, mounts
    base_fs = re.search(r"(/\S+/snapshots/\d+/fs)", mounts).group(1)
    with open(os.path.join(base_fs, "f"), "w") as f:
        f.write("x" * 10000)
    ctd.ctr(*s, "commit", "t-base-c", "t-base")
    mounts = ctd.ctr(*s, "prepare", "--mounts", "t-child", "t-base-c").stdout
    assert "overlay" in mounts and "lowerdir=" + base_fs in mounts
    view = ctd.ctr(*s, "view", "--mounts", "t-view", "t-base-c").stdout
    assert "ro" in view and base_fs in view
    usage = ctd.ctr(*s, "usage", "t-base-c").stdout
    assert re.search(r"t-base-c\s+\d+(\.\d+)? KiB\s+2\s", usage), usage  # the dir and f, in blocks
    ctd.ctr(*s, "label", "t-base-c", "team=lazybuild")
    info = ctd.ctr(*s, "info", "t-base-c").stdout
    assert '"team": "lazybuild"' in info and '"Kind": "Committed"' in info
    listed = ctd.ctr(*s, "ls").stdout
    assert "t-child" in listed  # (ctr labels no gc.root on a view: containerd's GC may already have taken it)
    r = ctd.ctr(*s, "rm", "t-base-c", check=False)
    assert r.returncode != 0  # it has children
    child_fs = re.search(r"upperdir=(/\S+/snapshots/\d+/fs)", mounts).group(1)
    ctd.ctr(*s, "rm", "t-child")
    assert "t-child" not in ctd.ctr(*s, "ls").stdout
    wait(lambda: not os.path.exists(child_fs), "the removed snapshot's directory to go")  # containerd's GC removes


def test_restart_keeps_snapshots_and_serves_from_cache_without_registry(tmp_path, images):
    """Stop and start the snapshotter while containerd runs: the lazy layers come back from the kept TOC;
    with the registry gone, what the cache holds still runs, and a layer that needs the registry is
    reported unavailable instead of failing the daemon."""
    reg = RegistryProcess(str(tmp_path / "registry"))
    ref = f"{reg.host}/sn/py:esgz"
    lazybuild("copy", f"{images.host}/sn/py:esgz", ref)  # registry to registry
    sn = Snapshotter(str(tmp_path / "snapshotter"))
    os.makedirs(sn.workdir)
    sn.start()
    os.makedirs(tmp_path / "containerd")
    ctd = Containerd(str(tmp_path / "containerd"), sn.sock)
    try:
        ctd.ctr_remote("images", "rpull", "--snapshotter", "lazybuild", "--plain-http", ref)
        assert run(ctd, ref, "r1", "python3", "-c", "print(1)").strip() == "1"

        sn.stop()
        assert not lazybuild_mounts(sn.root)
        sn.start()
        ctd.reconnected()
        wait(lambda: len(sn.status()["layers"]) == 2, "both lazy layers to be restored")
        assert not sn.status()["unavailable"]
        assert run(ctd, ref, "r2", "python3", "-c", "print(2)").strip() == "2"

        sn.stop()
        reg.stop()
        sn.start()  # the registry is gone: the layers open from what was kept
        ctd.reconnected()
        wait(lambda: len(sn.status()["layers"]) == 2, "both lazy layers to be restored")
        assert run(ctd, ref, "r3", "python3", "-c", "print(3)").strip() == "3"

        sn.stop()
        for d in os.listdir(os.path.join(sn.root, "tocs")):  # lose what was kept of one layer
            import shutil
            shutil.rmtree(os.path.join(sn.root, "tocs", d))
        sn.start()
        ctd.reconnected()
        # the layers are re-opened behind the served socket: the one that cannot be is reported then
        wait(lambda: sn.status()["unavailable"], "the layer without its kept TOC to be reported unavailable")
        assert len(sn.status()["layers"]) < 2
        r = ctd.ctr("run", "--rm", "--snapshotter", "lazybuild", ref, "r4", "true", check=False, timeout=120)
        assert r.returncode != 0 and "reachable" in r.stderr, r.stderr
        assert ctd.ctr("snapshots", "--snapshotter", "lazybuild", "ls").stdout.count("Committed") == 2
    finally:
        ctd.stop()
        sn.stop()
        if reg.proc.poll() is None:
            reg.stop()
    assert not lazybuild_mounts(sn.root)


def test_concurrent_pulls_and_runs_of_one_image(tmp_path, images):
    """Several clients pull the same image and run it at once (each layer's Prepare arrives several times
    together): every start succeeds, each layer is opened once and served lazily."""
    import threading

    sn = Snapshotter(str(tmp_path / "snapshotter"))
    os.makedirs(sn.workdir)
    sn.start()
    os.makedirs(tmp_path / "containerd")
    ctd = Containerd(str(tmp_path / "containerd"), sn.sock)
    ref = f"{images.host}/sn/py:esgz"
    outputs: list[str] = []

    def start(i: int) -> None:
        try:
            ctd.ctr_remote("images", "rpull", "--snapshotter", "lazybuild", "--plain-http", ref)
            outputs.append(run(ctd, ref, f"con{i}", "python3", "-c", f"print({i})").strip())
        except AssertionError as e:
            outputs.append(str(e))
    try:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outputs) == ["0", "1", "2", "3"], outputs
        layers = sn.status()["layers"]
        assert sorted(l["digest"] for l in layers.values()) == sorted(layer_digests(ref))
        big = max(layers.values(), key=lambda l: l["size"])
        assert big["lazy"] and big["fetchedBytes"] < 0.3 * big["size"], big
        assert sn.logs().count("served lazily as snapshot") == 2
        assert ctd.ctr("snapshots", "--snapshotter", "lazybuild", "ls").stdout.count("Committed") == 2
    finally:
        ctd.stop()
        sn.stop()
    assert not lazybuild_mounts(sn.root)


def test_removing_the_image_frees_layers_and_cache(daemons, images):
    sn, ctd = daemons
    ref = f"{images.host}/sn/py:esgz"
    chunks = os.path.join(sn.root, "cache", "chunks")
    assert du(chunks) > 0 and sn.status()["layers"]
    ctd.ctr("images", "rm", "--sync", ref)
    listed = ctd.ctr("snapshots", "--snapshotter", "lazybuild", "ls").stdout
    assert "sha256:" not in listed, listed  # the image's layer snapshots are gone (t-base-c is ctr's own)
    wait(lambda: not sn.status()["layers"] and not os.listdir(os.path.join(sn.root, "tocs")),
         "containerd's GC to remove the lazy layers and call Cleanup")
    assert not sn.status()["layers"]
    assert not os.listdir(os.path.join(sn.root, "tocs"))
    assert du(chunks) == 0
    assert lazybuild_mounts(sn.root) == [os.path.join(os.path.realpath(sn.root), "fuse")]


def test_lazybuild_rpull_without_the_reference_client(daemons, images):
    """`lazybuild rpull` attaches the remote-snapshot labels itself through containerd's API: eStargz layers
    are served lazily, a gzip image is downloaded, applied by containerd's diff service and committed."""
    import json

    sn, ctd = daemons
    esgz, legacy = f"{images.host}/sn/py:esgz", f"{images.host}/sn/py:legacy"
    ctd.ctr("images", "rm", "--sync", esgz, legacy, check=False)  # whatever an earlier test pulled
    wait(lambda: not sn.status()["layers"], "earlier lazy layers to be removed")
    report = json.loads(lazybuild("rpull", "--format", "json", "--address", ctd.sock, esgz))
    assert [l["how"] for l in report["layers"]] == ["lazy", "lazy"]
    assert esgz in ctd.ctr("images", "ls").stdout
    assert run(ctd, esgz, "rp1", "sh", "-c", "python3 -c 'print(1)'; cat /hello.txt").split("\n")[:2] == \
        ["1", "hello from the top layer"]
    wait(lambda: len(sn.status()["layers"]) == 2, "both layers to be served lazily")
    report = json.loads(lazybuild("rpull", "--format", "json", "--address", ctd.sock, legacy))
    assert [l["how"] for l in report["layers"]] == ["downloaded", "downloaded"]
    assert run(ctd, legacy, "rp2", "sh", "-c", "test -e /etc/motd || echo motd-gone").strip() == "motd-gone"
    again = json.loads(lazybuild("rpull", "--format", "json", "--address", ctd.sock, legacy))
    assert [l["how"] for l in again["layers"]] == ["present", "present"]
    ctd.ctr("images", "rm", "--sync", esgz, legacy)
    wait(lambda: not sn.status()["layers"], "the lazy layers to be removed with the image")
    r = subprocess.run(LAZYBUILD + ["rpull", "--address", "/nonexistent.sock", esgz], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "/nonexistent.sock" in r.stderr


def wait(pred, what: str, timeout_s: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
