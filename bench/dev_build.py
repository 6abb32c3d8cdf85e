#!/usr/bin/env python3
"""The dev-image build (examples/dev-image: compile in a ~400 MB Debian toolchain image, ship one static
binary), cold, side by side in one run:

- `lazybuild build`: the toolchain (eStargz in the registry) is mounted lazily; only what the compile
  reads is fetched;
- `DOCKER_BUILDKIT=1 docker build` on Docker 20.10 (BuildKit v0.8): the toolchain is pulled whole.

The lazy builds run on the toolchain as converted (eStargz) and as re-optimized for builds (the files
one build's RUN steps read, recorded with --record-base, put first behind the prefetch landmark).
Over loopback and over an emulated slow link (router namespace, 20 ms each way by nfqdelay, 200 Mbit/s
by tbf, as ../shared/tools/stargz-anchor does). Prints median wall time and bytes fetched, and the
ratios (goal on the slow link: >= 3x faster with <= 20% of the bytes).

    python3 bench/dev_build.py [--repeat 3] [--no-wan]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from lazy_pull import WAN_HOST, Wan  # bench/lazy_pull.py (python puts the script's folder on sys.path)

from lazybuild.testing.dockerd import Dockerd
from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess

here = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(here, "..", "examples", "dev-image")
PACKAGES = ("python3", "gcc", "libc6-dev", "make")


class Forwarder:
    """127.0.0.1:PORT -> the slow-link registry. Docker 20.10's BuildKit speaks plain HTTP only to
    loopback registries, so both builders reach the namespace registry through this, over the same link."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def lazy_build(toolchain: str, work: str, record: str = "") -> tuple[float, int]:
    run = tempfile.mkdtemp(dir=work)
    meta = os.path.join(run, "meta.json")
    cmd = ["lazybuild", "build", EXAMPLE, "--build-arg", f"TOOLCHAIN={toolchain}", "--output",
           f"type=oci,dest={run}/out.tar", "--state-dir", f"{run}/state", "--cache", f"{run}/cache",
           "--metadata-file", meta, "--progress", "quiet"] + (["--record-base", record] if record else [])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with open(meta) as f:
        fetched = sum(v["fetched"] for v in json.load(f)["bytesFetched"].values())
    shutil.rmtree(run, ignore_errors=True)
    return elapsed, fetched


def docker_build(dockerd: Dockerd, toolchain: str) -> float:
    dockerd.docker("rmi", "-f", toolchain, "dev-image-bench", check=False)
    dockerd.docker("builder", "prune", "-af", check=False)
    start = time.perf_counter()
    dockerd.build(EXAMPLE, "--build-arg", f"TOOLCHAIN={toolchain}", "-t", "dev-image-bench")
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-wan", action="store_true", help="loopback only")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="lazybuild-bench-dev-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    dockerd = wan = forwarder = None
    try:
        rootfs = debootstrap_rootfs(PACKAGES)
        archive = docker_archive([rootfs], os.path.join(work, "toolchain.tar"), cmd=["/bin/bash"])
        subprocess.run(["lazybuild", "push", f"docker-archive:{archive}", f"{registry.host}/toolchain:plain"],
                       check=True, capture_output=True)
        subprocess.run(["lazybuild", "convert", f"{registry.host}/toolchain:plain", f"{registry.host}/toolchain:esgz"],
                       check=True, capture_output=True)
        os.unlink(archive)
        info = json.loads(subprocess.run(["lazybuild", "inspect", f"{registry.host}/toolchain:esgz"], check=True,
                                         capture_output=True, text=True).stdout)
        image_bytes = sum(layer["size"] for layer in info["manifest"]["layers"])
        # The toolchain optimized for builds: what one build's RUN steps read goes first, behind the
        # prefetch landmark (lazybuild build --record-base, then lazybuild convert --prioritized-files).
        record = os.path.join(work, "base-reads.ndjson")
        lazy_build(f"{registry.host}/toolchain:esgz", work, record)
        subprocess.run(["lazybuild", "convert", f"{registry.host}/toolchain:plain", f"{registry.host}/toolchain:opt",
                        "--prioritized-files", record], check=True, capture_output=True)
        links = [("loopback", registry.host)]
        if not args.no_wan:
            wan = Wan(os.path.join(work, "registry", "data"), work)
            host, port = WAN_HOST.split(":")
            forwarder = Forwarder((host, int(port)))
            links.append(("20ms+200mbit", forwarder.host))
        dockerd = Dockerd(os.path.join(work, "dockerd"))
        rows = []
        for link, host in links:
            times: dict[str, list[float]] = {"esgz": [], "opt": [], "docker": []}
            fetched: dict[str, list[int]] = {"esgz": [], "opt": []}
            for _ in range(args.repeat):
                for variant in ("esgz", "opt"):
                    t, b = lazy_build(f"{host}/toolchain:{variant}", work)
                    times[variant].append(t)
                    fetched[variant].append(b)
                times["docker"].append(docker_build(dockerd, f"{host}/toolchain:esgz"))
            rows.append((link, times, fetched))
        print(f"dev-image build, cold, median of {args.repeat}; toolchain {image_bytes / 1e6:.1f} MB compressed "
              "(docker build pulls it whole):")
        print(f"{'link':14} {'toolchain':22} {'lazybuild build':>16} {'docker build':>13} {'speed-up':>9} "
              f"{'bytes fetched':>14} {'share':>6}")
        for link, times, fetched in rows:
            d = statistics.median(times["docker"])
            for variant, label in (("esgz", "eStargz"), ("opt", "eStargz, build-optimized")):
                o, b = statistics.median(times[variant]), statistics.median(fetched[variant])
                print(f"{link:14} {label:22} {o:14.2f} s {d:11.2f} s {d / o:8.2f}x {b / 1e6:11.1f} MB "
                      f"{100 * b / image_bytes:5.1f}%")
            print(f"{'':14} runs: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()))
    finally:
        if dockerd:
            dockerd.stop()
        if forwarder:
            forwarder.close()
        if wan:
            wan.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
