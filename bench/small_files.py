#!/usr/bin/env python3
"""Reading a tree of many small files through a lazy mount, side by side in one run:

  ours       `lazybuild mount` (mount_image) of the eStargz image, every file read once, in `diff -r` order
  old        the same with the read window off (a request per missed file, as before the read engine)
  reference  containerd + the reference stargz snapshotter (built by ../shared/tools/stargz-anchor/
             anchor-bench.sh): `ctr-remote images rpull`, then the same read of its FUSE mount of the layer

The image: --files files of 1-8 KiB (half text, half random bytes) in 50 directories, one eStargz layer
made by `lazybuild convert`, in a docker-registry of our own on loopback and, with "wan" in --nets,
served over anchor-bench.sh's emulated link (20 ms each way, 200 Mbit/s; its `wan-up` phase). Every run
is cold: fresh cache (ours) or fresh daemons and state (reference), page cache dropped, registry blobs
re-read into it. Every file's contents are checked against the source. Bytes and requests are the
registry's own access log (the same count for both). Prints the median of --repeat runs per cell and
the ratios ours / reference and ours / old.

    python3 bench/small_files.py [--files 5000] [--repeat 3] [--nets "lo wan"] [--modes "ours old reference"]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from lazybuild.testing.images import CACHE, docker_archive
from lazybuild.testing.registry import free_port

here = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(here, "..", "..", "shared"))
ANCHOR = os.path.join(SHARED, "tools", "stargz-anchor", "anchor-bench.sh")
WAN_HOST = "10.99.1.2:5000"  # anchor-bench.sh's registry behind the slow link
REPO = "bench/small"


def sh(*cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def make_tree(root: str, count: int) -> dict[str, str]:
    """`count` files of 1-8 KiB under `root`; returns {relative path: sha256}."""
    rnd = random.Random(5000)
    words = [b"lazy", b"stargz", b"small", b"file", b"registry", b"window", b"\n"]
    digests = {}
    for i in range(count):
        rel = f"d{i % 50:02d}/f{i:05d}.{'txt' if i % 2 else 'bin'}"
        size = rnd.randint(1024, 8192)
        data = b" ".join(rnd.choice(words) for _ in range(size // 4))[:size] if i % 2 else rnd.randbytes(size)
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def tar_tree(root: str, out: str) -> str:
    with tarfile.open(out, "w") as tf:
        for top, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(top, name)
                tf.add(full, os.path.relpath(full, root))
    return out


def read_tree(root: str, digests: dict[str, str]) -> None:
    """Read every file under `root` in `diff -r` order (sorted, depth first) and check it."""
    seen = 0
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root)
            if rel not in digests:
                continue  # the landmark files the layer carries
            with open(full, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digests[rel]:
                    raise SystemExit(f"{full}: wrong contents")
            seen += 1
    if seen != len(digests):
        raise SystemExit(f"{root}: {seen} of {len(digests)} files")


class AccessLog:
    """Bytes and requests of a docker-registry's access log (combined format) since mark()."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0

    def mark(self) -> None:
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def since(self) -> tuple[int, int]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", "replace")
        nbytes = requests = 0
        for m in re.finditer(r'"(GET|HEAD) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)', text):
            requests += 1
            nbytes += int(m.group(4)) if m.group(4) != "-" else 0
        return nbytes, requests


class LoopbackRegistry:
    """A docker-registry on 127.0.0.1 with its access log in a file (the anchor's settings)."""

    def __init__(self, work: str):
        self.storage = os.path.join(work, "regdata")
        self.host = f"127.0.0.1:{free_port()}"
        config = os.path.join(work, "reg-lo.yml")
        with open(config, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                    f"  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {self.host}\n")
        self.log = AccessLog(os.path.join(work, "reg-lo.log"))
        self.proc = subprocess.Popen(["docker-registry", "serve", config], stdout=open(self.log.path, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while subprocess.run(["curl", "-fs", f"http://{self.host}/v2/"], capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise SystemExit("the loopback registry did not come up")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def cold(storage: str) -> None:
    """Empty page cache, then the registry's blobs read back into it (a warm registry server)."""
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for top, _, files in os.walk(os.path.join(storage, "docker", "registry", "v2", "blobs")):
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def run_ours(ref: str, digests: dict[str, str], work: str, window: bool) -> float:
    from lazybuild.mounter import MountOptions, fetch, mount_image

    saved = fetch.WINDOW_BYTES
    if not window:
        fetch.WINDOW_BYTES = 0  # the old read path: a miss fetches its own chunks only (the child inherits it)
    mnt, cache = os.path.join(work, "mnt"), os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(mnt, exist_ok=True)
    try:
        start = time.perf_counter()
        m = mount_image(ref, mnt, MountOptions(cache_dir=cache, background_fetch=False, insecure=True))
        try:
            read_tree(mnt, digests)
            return time.perf_counter() - start
        finally:
            m.close()
    finally:
        fetch.WINDOW_BYTES = saved


class Reference:
    """containerd + the reference stargz snapshotter, driven by anchor-bench.sh's phases."""

    def __init__(self, work: str, storage: str):
        self.a = os.path.join(work, "anchor")
        os.makedirs(self.a, exist_ok=True)
        self.env = {**os.environ, "A": self.a, "BIN": os.path.join(CACHE, "anchor-bin"), "REG_DATA": storage,
                    "REG_CONFIG": os.path.join(self.a, "reg-push.yml"), "OTHER_CMD": ""}
        if not os.access(os.path.join(self.env["BIN"], "ctr-remote"), os.X_OK):
            self.anchor("deps", "build")

    def anchor(self, *phases: str) -> None:
        subprocess.run(["bash", ANCHOR, *phases], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def run(self, ref: str, digests: dict[str, str]) -> float:
        self.anchor("daemons")  # from empty state
        ctr = [os.path.join(self.env["BIN"], "ctr-remote"), "-a", os.path.join(self.a, "containerd", "containerd.sock")]
        start = time.perf_counter()
        sh(*ctr, "images", "rpull", "--snapshotter", "stargz", "--plain-http", ref)
        root = os.path.join(self.a, "stargz", "root")
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(root) and "fuse" in line.split()[2]]
        if len(mounts) != 1:
            raise SystemExit(f"expected one stargz FUSE mount under {root}, found {mounts}")
        read_tree(mounts[0], digests)
        return time.perf_counter() - start

    def wan_log(self) -> AccessLog:
        return AccessLog(os.path.join(self.a, "logs", "reg-wan.log"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nets", default="lo wan")
    ap.add_argument("--modes", default="ours old reference")
    ap.add_argument("--workdir", default="/tmp/lazybuild-bench-small-files")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, page cache, network namespaces)")
    modes, nets = args.modes.split(), args.nets.split()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    registry = LoopbackRegistry(work)
    reference = None
    try:
        digests = make_tree(os.path.join(work, "src"), args.files)
        tar = tar_tree(os.path.join(work, "src"), os.path.join(work, "layer.tar"))
        ref = f"{registry.host}/{REPO}:esgz"
        sh("lazybuild", "convert", f"docker-archive:{docker_archive([tar], os.path.join(work, 'img.tar'))}", ref,
           env={**os.environ, "CI": "1"})
        if "reference" in modes or "wan" in nets:
            reference = Reference(work, registry.storage)
        if "wan" in nets:
            reference.anchor("wan-up")
        layer_size = sum(os.path.getsize(os.path.join(t, n)) for t, _, fs in
                         os.walk(os.path.join(registry.storage, "docker", "registry", "v2", "blobs")) for n in fs)
        print(f"{args.files} files of 1-8 KiB ({os.path.getsize(tar) / 1e6:.1f} MB tar, {layer_size / 1e6:.1f} MB of "
              f"blobs); median of {args.repeat} cold runs; bytes and requests from the registry's access log")
        print(f"{'link':9} {'mode':10} {'seconds':>8} {'MB':>7} {'requests':>9}")
        results: dict[tuple[str, str], tuple[float, int, int]] = {}
        for net in nets:
            host, log = (registry.host, registry.log) if net == "lo" else (WAN_HOST, reference.wan_log())
            net_ref = ref.replace(registry.host, host)
            for mode in modes:
                runs = []
                for _ in range(args.repeat):
                    cold(registry.storage)
                    log.mark()
                    if mode == "reference":
                        seconds = reference.run(net_ref, digests)
                    else:
                        seconds = run_ours(net_ref, digests, work, window=mode == "ours")
                    runs.append((seconds, *log.since()))
                cell = (statistics.median(r[0] for r in runs), int(statistics.median(r[1] for r in runs)),
                        int(statistics.median(r[2] for r in runs)))
                results[(net, mode)] = cell
                print(f"{net:9} {mode:10} {cell[0]:8.2f} {cell[1] / 1e6:7.2f} {cell[2]:9d}", flush=True)
        print("\nratios (time, bytes, requests)")
        for net in nets:
            ours = results.get((net, "ours"))
            for other in ("reference", "old"):
                them = results.get((net, other))
                if ours and them:
                    print(f"{net:9} ours / {other:9}  time {ours[0] / them[0]:5.2f}x  bytes {ours[1] / them[1]:5.2f}x  "
                          f"requests {ours[2] / them[2]:5.2f}x")
    finally:
        if reference is not None:
            reference.anchor("down")  # its daemons and the slow link (it ends only what it started)
        registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
