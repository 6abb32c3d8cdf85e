"""`lazybuild mount` on real FUSE against a real registry: the merged tree, lazy reads, overlay + chroot,
records, faults. The model under it (layers, prefetch, trees) is checked without FUSE in test_mounter_model.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import tarfile
import time

import pytest

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.cli_runner import lazybuild
from support.registry import FaultProxy


class Mount:
    def __init__(self, ref, where, cache, *extra):
        self.dir = str(where)
        os.makedirs(self.dir, exist_ok=True)
        lazybuild("mount", "--daemon", ref, self.dir, "--cache", str(cache), *extra)

    def status(self):
        return json.loads(lazybuild("mount", "--status", "--format", "json", self.dir).stdout)

    def close(self):
        lazybuild("umount", self.dir)
        for _ in range(100):
            if not _mounted(self.dir):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.dir} still mounted")


class Overlay:
    """overlayfs with the mount as its lower dir: the writable root a container would get."""

    def __init__(self, lower, where):
        self.root = where
        for sub in ("upper", "work", "merged"):
            (where / sub).mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={where}/upper,workdir={where}/work", str(where / "merged")], check=True)
        self.merged = str(where / "merged")

    def run(self, *cmd) -> str:
        return subprocess.run(["chroot", self.merged, *cmd], capture_output=True, text=True, check=True).stdout

    def close(self):
        subprocess.run(["umount", self.merged], check=True)


def _mounted(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def _walk(root):
    """{path: (type, mode, uid, gid, size|target|sha)} of a tree on disk, hardlinks as their inode groups."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out, sorted(sorted(v) for v in inodes.values() if len(v) > 1)


@pytest.fixture(scope="module")
def debian(registry, tmp_path_factory):
    """The Debian rootfs image as pushed (uncompressed) and as optimized eStargz, and the rootfs unpacked."""
    d = tmp_path_factory.mktemp("debian-mount")
    rootfs = debootstrap_rootfs()
    base, esgz = f"{registry.host}/mount/debian:base", f"{registry.host}/mount/debian:esgz"
    lazybuild("push", f"docker-archive:{docker_archive([rootfs], str(d / 'img.tar'))}", base)
    prio = d / "prio.txt"
    prio.write_text("usr/bin/python3.11\nusr/lib/python3.11/os.py\nusr/lib/python3.11/site.py\n")
    lazybuild("convert", base, esgz, "--prioritized-files", str(prio))
    unpacked = d / "rootfs"
    unpacked.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpf", rootfs, "-C", str(unpacked)], check=True)
    return {"base": base, "esgz": esgz, "rootfs": str(unpacked), "dir": d}


def test_mount_matches_the_rootfs_and_runs_programs_lazily(debian, tmp_path):
    m = Mount(debian["esgz"], tmp_path / "mnt", tmp_path / "cache", "--no-background-fetch",
              "--record", str(tmp_path / "record.ndjson"))
    try:
        ov = Overlay(m.dir, tmp_path / "ov")
        try:
            assert ov.run("/usr/bin/python3", "-c", "print(1)") == "1\n"
            with open(os.path.join(ov.merged, "tmp", "hello.c"), "w") as f:
                f.write('#include <stdio.h>\nint main(){puts("hi");return 0;}\n')
            assert ov.run("sh", "-c", "cd /tmp && gcc hello.c -o hello && ./hello") == "hi\n"
        finally:
            ov.close()
        layer = m.status()["layers"][0]
        assert layer["lazy"] and layer["fetchedBytes"] < 0.3 * layer["size"], layer  # a small part of the image
        records = [json.loads(line) for line in (tmp_path / "record.ndjson").read_text().splitlines()]
        assert {"path": "usr/bin/python3.11", "layer": 0} in records

        mine, my_links = _walk(m.dir)
        theirs, their_links = _walk(debian["rootfs"])
        mine.pop(".prefetch.landmark")
        mine.pop("stargz.index.json", None)
        assert mine == theirs and my_links == their_links
        st = os.statvfs(m.dir)
        assert st.f_blocks > 0
        with pytest.raises(OSError) as e:
            open(os.path.join(m.dir, "etc", "hostname"), "w")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    finally:
        m.close()


def test_layers_that_are_not_estargz_still_mount(debian, tmp_path):
    m = Mount(debian["base"], tmp_path / "mnt", tmp_path / "cache")
    try:
        with open(os.path.join(m.dir, "etc", "os-release")) as f:
            assert "Debian" in f.read()
        assert m.status()["layers"][0]["lazy"] is False
    finally:
        m.close()


def test_whiteouts_devices_and_hardlinks(registry, archive, tmp_path):
    ref = f"{registry.host}/mount/layers:esgz"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    m = Mount(ref, tmp_path / "mnt", tmp_path / "cache")
    try:
        etc = os.listdir(os.path.join(m.dir, "etc"))
        assert "motd" in etc and "empty" not in etc and not any(n.startswith(".wh.") for n in etc)
        st = os.lstat(os.path.join(m.dir, "dev", "null"))
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        a, b = os.stat(os.path.join(m.dir, "etc", "hello.txt")), os.stat(os.path.join(m.dir, "etc", "hl"))
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert os.stat(os.path.join(m.dir, "bin", "suid")).st_mode & 0o7777 == 0o4755
        with open(os.path.join(m.dir, "data", "f12305"), "rb") as f:
            data = f.read()
        assert len(data) == 12305
    finally:
        m.close()
    assert not _mounted(m.dir)


def test_corrupt_or_vanishing_registry_gives_eio(registry, archive, tmp_path):
    ref = f"{registry.host}/mount/faults:esgz"
    lazybuild("convert", f"docker-archive:{archive}", ref, "--chunk-size", "4KiB")
    proxy = FaultProxy(registry.host)
    try:
        m = Mount(ref.replace(registry.host, proxy.host), tmp_path / "mnt", tmp_path / "cache",
                  "--no-background-fetch", "--no-prefetch", "--timeout", "2")
        try:
            proxy.faults = {"corrupt_ranges": True}
            with pytest.raises(OSError) as e:
                open(os.path.join(m.dir, "data", "f4096"), "rb").read()
            assert e.value.errno == errno.EIO
            proxy.faults = {"status": [(503, 1000)]}
            start = time.monotonic()
            with pytest.raises(OSError) as e:
                open(os.path.join(m.dir, "data", "f8192"), "rb").read()
            assert e.value.errno == errno.EIO and time.monotonic() - start < 60
            proxy.faults = {}
            with open(os.path.join(m.dir, "data", "f8192"), "rb") as f:  # back: the same read now works
                assert len(f.read()) == 8192
        finally:
            m.close()
    finally:
        proxy.stop()


def test_layers_mode_is_an_overlay_lowerdir_stack(registry, archive, tmp_path):
    ref = f"{registry.host}/mount/layers:esgz2"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    m = Mount(ref, tmp_path / "mnt", tmp_path / "cache", "--layers")
    try:
        assert sorted(os.listdir(m.dir)) == ["0", "1"]
        wh = os.lstat(os.path.join(m.dir, "1", "etc", "empty"))
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0  # the whiteout, as overlayfs spells it
        merged = tmp_path / "merged"
        merged.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={m.dir}/1:{m.dir}/0", str(merged)], check=True)
        try:
            etc = os.listdir(merged / "etc")
            assert "motd" in etc and "empty" not in etc and "hello.txt" in etc
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        m.close()


def test_sigterm_unmounts_and_a_second_mount_shares_the_cache(registry, archive, tmp_path):
    ref = f"{registry.host}/mount/shared:esgz"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    cache = tmp_path / "cache"
    first = Mount(ref, tmp_path / "a", cache, "--no-background-fetch")
    with open(os.path.join(first.dir, "data", "f12305"), "rb") as f:
        assert len(f.read()) == 12305
    os.kill(first.status()["pid"], 15)
    for _ in range(100):
        if not _mounted(first.dir):
            break
        time.sleep(0.05)
    assert not _mounted(first.dir)
    second = Mount(ref, tmp_path / "b", cache, "--no-background-fetch", "--no-prefetch")
    try:
        before = second.status()["layers"][0]["fetchedBytes"]
        with open(os.path.join(second.dir, "data", "f12305"), "rb") as f:
            assert len(f.read()) == 12305
        for _ in range(40):  # the status file is rewritten every second
            after = second.status()["layers"][0]
            if after["servedFromCache"] >= 12305:
                break
            time.sleep(0.1)
        assert after["fetchedBytes"] == before and after["servedFromCache"] >= 12305
    finally:
        second.close()


def test_a_directory_of_100000_entries(registry, tmp_path):
    import io

    src = tmp_path / "big-dir.tar"
    with tarfile.open(src, "w") as tf:
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for i in range(100_000):
            info = tarfile.TarInfo(f"d/f{i:06d}")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"%02d" % (i % 100)))
    layer = tmp_path / "layer.esgz"
    blob = json.loads(lazybuild("layer", "convert", "--format", "json", str(src), str(layer)).stdout)
    ref = f"{registry.host}/mount/bigdir:esgz"
    archive = docker_archive([str(src)], str(tmp_path / "img.tar"))
    lazybuild("convert", f"docker-archive:{archive}", ref)
    m = Mount(ref, tmp_path / "mnt", tmp_path / "cache", "--no-background-fetch")
    try:
        names = os.listdir(os.path.join(m.dir, "d"))
        assert len(names) == 100_000 and "f099999" in names
        with open(os.path.join(m.dir, "d", "f012345"), "rb") as f:
            assert f.read() == b"45"
    finally:
        m.close()
    assert blob["tocDigest"].startswith("sha256:")


def test_debian_image_through_a_faulty_registry(debian, registry, tmp_path):
    """The same chroot run through the fault-injecting proxy: bursts of 500/429, multi-range refused,
    blob GETs redirected to another port. The run succeeds with the right bytes."""
    proxy = FaultProxy(registry.host)
    try:
        proxy.faults = {"status": [(500, 2), (429, 1)], "reject_multirange": True, "redirect_blobs": True}
        m = Mount(debian["esgz"].replace(registry.host, proxy.host), tmp_path / "mnt", tmp_path / "cache",
                  "--no-background-fetch")
        try:
            ov = Overlay(m.dir, tmp_path / "ov")
            try:
                proxy.faults["status"] = [(503, 1), (500, 1)]
                assert ov.run("/usr/bin/python3", "-c", "print(6 * 7)") == "42\n"
            finally:
                ov.close()
            with open(os.path.join(m.dir, "etc", "os-release")) as f, \
                    open(os.path.join(debian["rootfs"], "etc", "os-release")) as g:
                assert f.read() == g.read()
        finally:
            m.close()
        assert any(port == proxy.redirect_port for port, *_ in proxy.requests)
    finally:
        proxy.stop()


class _Zeros:
    """A file object of `size` zero bytes ending in a marker, without holding it in memory."""

    def __init__(self, size: int, tail: bytes):
        self.size, self.tail, self.pos = size, tail, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        start, self.pos = self.pos, self.pos + n
        zeros_end = self.size - len(self.tail)
        head = b"\0" * max(0, min(self.pos, zeros_end) - start)
        return head + self.tail[max(0, start - zeros_end):max(0, self.pos - zeros_end)]


def test_a_file_over_4_gib(registry, tmp_path):
    size, tail = (4 << 30) + 4097, b"past the 32-bit boundary"
    src = tmp_path / "huge.tar"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("huge.bin")
        info.size = size
        tf.addfile(info, _Zeros(size, tail))
    # Convert the one layer and push it from an OCI layout: the 4 GiB tar is the only big file on disk.
    from lazybuild.image import OCI_CONFIG, Descriptor, Manifest
    from lazybuild.layout import OCILayout

    layout = OCILayout(str(tmp_path / "layout"), create=True)
    blob = json.loads(lazybuild("layer", "convert", "--format", "json", str(src), str(tmp_path / "layer")).stdout)
    src.unlink()
    layout.adopt_blob(blob["digest"], str(tmp_path / "layer"))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [blob["diffID"]]}}).encode()
    manifest = Manifest.build(Descriptor(OCI_CONFIG, layout.put_bytes(config), len(config)),
                              [Descriptor(blob["mediaType"], blob["digest"], blob["size"], blob["annotations"])])
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), "huge")
    ref = f"{registry.host}/mount/huge:esgz"
    lazybuild("push", f"oci:{layout.root}:huge", ref)
    m = Mount(ref, tmp_path / "mnt", tmp_path / "cache", "--no-background-fetch")
    try:
        path = os.path.join(m.dir, "huge.bin")
        assert os.stat(path).st_size == size
        with open(path, "rb") as f:
            f.seek(size - len(tail) - 3)
            assert f.read() == b"\0\0\0" + tail
        assert m.status()["layers"][0]["fetchedBytes"] < 50 << 20  # the end of a 4 GiB file, not all of it
    finally:
        m.close()


def test_identical_files_do_not_stall_background_fetch_or_prefetch(registry, tmp_path):
    """Files with identical contents share a chunk digest (one cache entry, one lock): the background
    fetch, the prefetch and readers must take that lock once, or the mount hangs on the next read."""
    import io

    src = tmp_path / "dups.tar"
    with tarfile.open(src, "w") as tf:
        for i in range(40):
            info = tarfile.TarInfo(f"d/f{i:02d}")
            data = (b"same content\n" if i % 2 else b"%d-unique\n" % i) * 100
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    prio = tmp_path / "prio.txt"
    prio.write_text("".join(f"d/f{i:02d}\n" for i in range(10)))
    ref = f"{registry.host}/mount/dups:esgz"
    archive = docker_archive([str(src)], str(tmp_path / "img.tar"))
    lazybuild("convert", f"docker-archive:{archive}", ref, "--prioritized-files", str(prio))
    m = Mount(ref, tmp_path / "mnt", tmp_path / "cache")
    try:
        deadline = time.time() + 30
        while m.status()["layers"][0]["fetchedPercent"] < 100 and time.time() < deadline:
            time.sleep(0.2)  # the background fetch takes the rest, identical chunks in one batch
        for i in range(40):
            with open(os.path.join(m.dir, "d", f"f{i:02d}"), "rb") as f:
                assert f.read().startswith(b"same" if i % 2 else b"%d-unique" % i)
    finally:
        m.close()


def test_footer_and_toc_are_kept_beside_the_cache_and_refetched_when_torn(registry, archive, tmp_path):
    """A second mount of the same layers with the same cache reads footer and TOC from disk (no ranged
    request before the first file read); a kept file that was altered fails the TOC digest check and is
    fetched again, and the mount works."""
    ref = f"{registry.host}/mount/kept-tocs:esgz"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    proxy = FaultProxy(registry.host)
    cache = tmp_path / "cache"
    try:
        via = ref.replace(registry.host, proxy.host)

        def ranged() -> int:
            return sum(1 for _, method, path, headers in proxy.requests
                       if method == "GET" and "/blobs/" in path and "Range" in headers)

        for round_ in ("first", "kept", "torn"):
            proxy.requests.clear()
            m = Mount(via, tmp_path / f"mnt-{round_}", cache, "--no-background-fetch", "--no-prefetch")
            try:
                opened = ranged()
                with open(os.path.join(m.dir, "data", "f8192"), "rb") as f:
                    assert len(f.read()) == 8192
            finally:
                m.close()
            kept = sorted(str(p) for p in (cache / "tocs").glob("sha256-*/*"))
            assert kept, "nothing kept under the cache's tocs/"
            if round_ == "first":
                assert opened >= 2  # one tail read per layer
            elif round_ == "kept":
                assert opened == 0
                for path in kept:  # alter every kept read (same length): the next mount must not trust them
                    with open(path, "r+b") as f:
                        f.write(b"\xa5" * os.path.getsize(path))
            else:
                assert opened >= 2  # fetched again, and the mount served
    finally:
        proxy.stop()
