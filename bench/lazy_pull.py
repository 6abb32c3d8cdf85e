#!/usr/bin/env python3
"""Cold start of `python3 -c 'print(1)'` and `gcc hello.c` from a registry, side by side in one run:

  (a) legacy: pull the tar.gz image and extract it, then run in the extracted tree
  (b) lazy:   `lazybuild mount` of the unoptimized eStargz image, overlayfs on top, run in a chroot
  (c) opt:    the same on the optimized eStargz image (files the workloads read first, from a
              `lazybuild mount --record` of both workloads, before the prefetch landmark)

over loopback and, with --wan, over an emulated slow link: the registry in its own network namespace
behind a router namespace (veth pairs), 20 ms each way (nfqdelay, built from ../shared/tools) and
200 Mbit/s (tbf), as ../shared/tools/stargz-anchor/anchor-bench.sh does. Prints seconds and bytes
fetched per cell (median of --repeat cold runs) and the ratios against (a).

    python3 bench/lazy_pull.py [--repeat 3] [--wan] [--throughput-only]

and the sequential read throughput of a 500 MB file: cold from the registry, warm from the chunk
cache, and from the local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess

here = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(here, "..", "..", "shared"))
HELLO = '#include <stdio.h>\nint main(){puts("hi");return 0;}\n'
WORKLOADS = {"python": "python3 -c 'print(1)'", "gcc": "cd /tmp && gcc hello.c -o hello && ./hello"}
WAN_HOST = "10.99.1.2:5000"  # inside the namespace this bench creates


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def lazybuild(*args) -> str:
    return sh("lazybuild", *args, env={**os.environ, "CI": "1"})


def push_legacy(rootfs: str, ref: str, work: str) -> None:
    """The image as `docker push` would have it: one tar.gz layer."""
    from lazybuild.image import OCI_CONFIG, OCI_LAYER_GZIP, Descriptor, Manifest, sha256_digest
    from lazybuild.layout import OCILayout

    layout = OCILayout(os.path.join(work, "legacy"), create=True)
    gz = os.path.join(work, "layer.tar.gz")
    sh("sh", "-c", f"gzip -6 -c {rootfs} > {gz}")
    with open(gz, "rb") as f:
        data = f.read()
    diff_id = "sha256:" + sh("sha256sum", rootfs).split()[0]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "config": {"Cmd": ["/bin/sh"]}}).encode()
    cfg = Descriptor(OCI_CONFIG, layout.put_bytes(config), len(config))
    layer = Descriptor(OCI_LAYER_GZIP, layout.put_bytes(data), len(data))
    m = Manifest.build(cfg, [layer])
    layout.put_bytes(m.raw)
    layout.add_to_index(m.descriptor(), "legacy")
    lazybuild("push", f"oci:{layout.root}:legacy", ref)
    assert sha256_digest(data) == layer.digest


def run_in(root: str, workload: str) -> None:
    with open(os.path.join(root, "tmp", "hello.c"), "w") as f:
        f.write(HELLO)
    sh("chroot", root, "sh", "-c", workload)


def cold_legacy(ref: str, workload: str, work: str) -> tuple[float, int]:
    d = tempfile.mkdtemp(dir=work)
    start = time.perf_counter()
    lazybuild("pull", ref, f"oci:{d}/img:x", "--insecure")
    index = json.load(open(f"{d}/img/index.json"))
    manifest = json.load(open(f"{d}/img/blobs/sha256/{index['manifests'][0]['digest'].split(':')[1]}"))
    root = os.path.join(d, "rootfs")
    os.makedirs(root)
    size = 0
    for layer in manifest["layers"]:
        blob = f"{d}/img/blobs/sha256/{layer['digest'].split(':')[1]}"
        size += layer["size"]
        sh("tar", "-xzf", blob, "-C", root)
    run_in(root, workload)
    elapsed = time.perf_counter() - start
    shutil.rmtree(d)
    return elapsed, size


def cold_lazy(ref: str, workload: str, work: str, record: str | None = None) -> tuple[float, int]:
    d = tempfile.mkdtemp(dir=work)
    mnt, ov = os.path.join(d, "mnt"), os.path.join(d, "ov")
    for p in (mnt, f"{ov}/upper", f"{ov}/work", f"{ov}/merged"):
        os.makedirs(p)
    extra = ["--record", record] if record else []
    start = time.perf_counter()
    lazybuild("mount", "--daemon", "--no-background-fetch", "--insecure", "--cache", os.path.join(d, "cache"), ref, mnt,
              *extra)
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={mnt},upperdir={ov}/upper,workdir={ov}/work", f"{ov}/merged")
    try:
        run_in(f"{ov}/merged", workload)
        elapsed = time.perf_counter() - start
    finally:
        subprocess.run(["umount", f"{ov}/merged"])
    time.sleep(0.5)  # the mount rewrites its status file every 0.25 s
    fetched = sum(layer["fetchedBytes"] for layer in json.loads(lazybuild("mount", "--status", "--format", "json", mnt))["layers"])
    lazybuild("umount", mnt)
    time.sleep(0.2)
    shutil.rmtree(d, ignore_errors=True)
    return elapsed, fetched


class Wan:
    """Router + registry namespaces, veth pairs, delay by nfqdelay and rate by tbf. The registry answers on
    `self.host` (NET.1.2:5000). `name` and `net` keep two benches' links apart (namespace and link names are
    global, and anchor-bench.sh's link takes 10.99 too); `access_log` keeps the registry's access log."""

    def __init__(self, storage: str, work: str, delay: str = "20ms", rate: str = "200mbit", name: str = "lzb",
                 net: str = "10.99", access_log: str | None = None):
        self.procs = []
        self.name = name
        self.host = f"{net}.1.2:5000"
        go = shutil.which("go") or sys.exit("--wan needs Go to build nfqdelay (bash scripts/setup.sh installs it)")
        nfq = os.path.join(work, "nfqdelay")
        src = os.path.join(SHARED, "tools", "stargz-anchor", "snapshotter", "nfqdelay")
        tmp_src = os.path.join(work, "nfqdelay-src")
        shutil.copytree(src, tmp_src)
        if subprocess.run(["dpkg", "-s", "golang-golang-x-sys-dev"], capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "install", "-y", "-qq", "golang-golang-x-sys-dev"], check=True, capture_output=True)
        subprocess.run([go, "build", "-o", nfq, "."], cwd=tmp_src, check=True,
                       env={**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode",
                            "GOCACHE": os.path.join(work, "gocache")})
        if not shutil.which("iptables-legacy"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "iptables"], check=True, capture_output=True)
        try:
            self._up(nfq, storage, work, delay, rate, net, access_log)
        except BaseException:
            self.close()  # a half-made link must not outlive the bench
            raise

    def _up(self, nfq: str, storage: str, work: str, delay: str, rate: str, net: str, access_log: str | None) -> None:
        n = self.name
        R, G = ["ip", "netns", "exec", f"{n}-rtr"], ["ip", "netns", "exec", f"{n}-reg"]
        for cmd in (["ip", "netns", "add", f"{n}-rtr"], ["ip", "netns", "add", f"{n}-reg"],
                    ["ip", "link", "add", f"veth-{n}-h", "type", "veth", "peer", "name", f"veth-{n}-r0"],
                    ["ip", "link", "set", f"veth-{n}-r0", "netns", f"{n}-rtr"],
                    ["ip", "link", "add", f"veth-{n}-r1", "type", "veth", "peer", "name", f"veth-{n}-reg"],
                    ["ip", "link", "set", f"veth-{n}-r1", "netns", f"{n}-rtr"],
                    ["ip", "link", "set", f"veth-{n}-reg", "netns", f"{n}-reg"],
                    ["ip", "addr", "add", f"{net}.0.1/24", "dev", f"veth-{n}-h"], ["ip", "link", "set", f"veth-{n}-h", "up"],
                    ["ip", "route", "add", f"{net}.1.0/24", "via", f"{net}.0.2", "dev", f"veth-{n}-h"],
                    R + ["ip", "link", "set", "lo", "up"],
                    R + ["ip", "addr", "add", f"{net}.0.2/24", "dev", f"veth-{n}-r0"], R + ["ip", "link", "set", f"veth-{n}-r0", "up"],
                    R + ["ip", "addr", "add", f"{net}.1.1/24", "dev", f"veth-{n}-r1"], R + ["ip", "link", "set", f"veth-{n}-r1", "up"],
                    R + ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                    G + ["ip", "link", "set", "lo", "up"],
                    G + ["ip", "addr", "add", f"{net}.1.2/24", "dev", f"veth-{n}-reg"], G + ["ip", "link", "set", f"veth-{n}-reg", "up"],
                    G + ["ip", "route", "add", "default", "via", f"{net}.1.1"]):
            subprocess.run(cmd, check=True)
        self.procs.append(subprocess.Popen(R + [nfq, "-delay", delay, "-queues", "0,1"], stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for i, dev in ((0, f"veth-{n}-r0"), (1, f"veth-{n}-r1")):
            subprocess.run(R + ["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-i", dev, "-j", "NFQUEUE",
                                "--queue-num", str(i)], check=True)
            subprocess.run(R + ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                                "latency", "100ms"], check=True)
        config = os.path.join(work, f"reg-{n}.yml")
        with open(config, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
                    f"http:\n  addr: {self.host}\n")
        # the registry prints its access log (one line per request, with the bytes sent) on stdout
        log = open(access_log, "ab") if access_log else subprocess.DEVNULL
        self.procs.append(subprocess.Popen(G + ["docker-registry", "serve", config], stdout=log,
                                           stderr=subprocess.DEVNULL))
        if access_log:
            log.close()
        deadline = time.time() + 20
        while subprocess.run(["curl", "-fs", f"http://{self.host}/v2/"], capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise SystemExit("the WAN registry did not come up")
            time.sleep(0.2)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "link", "del", f"veth-{self.name}-h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"{self.name}-reg"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"{self.name}-rtr"], capture_output=True)


def drop_caches() -> None:
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(path: str) -> tuple[float, str]:
    import hashlib

    h = hashlib.sha256()
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return time.perf_counter() - start, h.hexdigest()


def throughput(registry_host: str, work: str, size_mb: int = 500) -> None:
    """Sequential read of one big file: cold (from the registry), warm (our chunk cache, a fresh mount)
    and the same file on the local disk, page cache dropped before each."""
    src = os.path.join(work, "big")
    os.makedirs(os.path.join(src, "data"))
    with open(os.path.join(src, "data", "big.bin"), "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size_mb):  # half incompressible, half repetitive, like binaries and text
            f.write(block if i % 2 else bytes(range(256)) * 4096)
    tar = os.path.join(work, "big.tar")
    sh("tar", "-C", src, "-cf", tar, ".")
    ref = f"{registry_host}/bench/big:esgz"
    lazybuild("convert", f"docker-archive:{docker_archive([tar], os.path.join(work, 'big-img.tar'))}", ref)
    cache = os.path.join(work, "big-cache")
    rows = []
    for label in ("cold (registry)", "warm (chunk cache)"):
        mnt = tempfile.mkdtemp(dir=work)
        lazybuild("mount", "--daemon", "--no-background-fetch", "--no-prefetch", "--cache", cache, ref, mnt)
        drop_caches()
        rows.append((label, read_all(os.path.join(mnt, "data", "big.bin"))))
        lazybuild("umount", mnt)
        time.sleep(0.2)
    drop_caches()
    rows.append(("local disk", read_all(os.path.join(src, "data", "big.bin"))))
    local = rows[-1][1][0]
    assert len({digest for _, (_, digest) in rows}) == 1, "the mount returned other bytes than the file"
    print(f"\nsequential read of a {size_mb} MB file (contents checked; sha256 included in every timing)")
    for label, (sec, _) in rows:
        print(f"{label:20} {sec:6.2f} s {size_mb / sec:8.1f} MB/s {local / sec * 100:6.0f}% of local disk")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wan", action="store_true", help="also over the emulated 20 ms / 200 Mbit link")
    ap.add_argument("--throughput-only", action="store_true", help="only the sequential-read measurement")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, chroot, network namespaces)")
    work = tempfile.mkdtemp(prefix="lazybuild-bench-lazy-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    wan = None
    try:
        if args.throughput_only:
            throughput(registry.host, work)
            return 0
        rootfs = debootstrap_rootfs()
        refs = {k: f"{registry.host}/bench/dev:{k}" for k in ("legacy", "esgz", "opt")}
        push_legacy(rootfs, refs["legacy"], work)
        lazybuild("convert", refs["legacy"], refs["esgz"])
        record = os.path.join(work, "record.ndjson")
        for w in WORKLOADS.values():  # the optimizer's profile: what both workloads read, in order
            cold_lazy(refs["esgz"], w, work, record)
        lazybuild("convert", refs["esgz"], refs["opt"], "--force", "--prioritized-files", record)
        links = [("loopback", registry.host)]
        if args.wan:
            wan = Wan(os.path.join(work, "registry", "data"), work)
            links.append(("wan 20ms/200mbit", WAN_HOST))
        print(f"image: {os.path.getsize(rootfs) / 1e6:.0f} MB rootfs (debootstrap minbase + python3 + gcc); "
              f"median of {args.repeat} cold runs")
        print(f"{'link':18} {'workload':8} {'mode':7} {'seconds':>8} {'MB fetched':>11} {'speedup':>8} {'bytes':>6}")
        for link, host in links:
            for wname, w in WORKLOADS.items():
                base = None
                for mode, fn in (("legacy", cold_legacy), ("lazy", cold_lazy), ("opt", cold_lazy)):
                    ref = refs[{"legacy": "legacy", "lazy": "esgz", "opt": "opt"}[mode]].replace(registry.host, host)
                    runs = [fn(ref, w, work) for _ in range(args.repeat)]
                    sec, fetched = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
                    if base is None:
                        base = (sec, fetched)
                    print(f"{link:18} {wname:8} {mode:7} {sec:8.2f} {fetched / 1e6:11.1f} {base[0] / sec:7.1f}x "
                          f"{100 * fetched / base[1]:5.0f}%")
        throughput(registry.host, work)
    finally:
        if wan:
            wan.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
