#!/usr/bin/env python3
"""The dev-image build (examples/dev-image: compile in a ~400 MB Debian toolchain image, ship one static
binary), cold, side by side in one run:

- `lazybuild build`: the toolchain (eStargz in the registry) is mounted lazily; only what the compile
  reads is fetched;
- `DOCKER_BUILDKIT=1 docker build` on Docker 20.10 (BuildKit v0.8): the toolchain is pulled whole.

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
import statistics
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests"))
sys.path.insert(0, here)
from dockerd_harness import Dockerd  # noqa: E402
from images import debootstrap_rootfs, docker_archive  # noqa: E402
from lazy_pull import WAN_HOST, Wan  # noqa: E402
from registry_harness import RegistryProcess  # noqa: E402

EXAMPLE = os.path.join(here, "..", "examples", "dev-image")
PACKAGES = ("python3", "gcc", "libc6-dev", "make")


def lazy_build(toolchain: str, work: str, insecure: bool) -> tuple[float, int]:
    run = tempfile.mkdtemp(dir=work)
    meta = os.path.join(run, "meta.json")
    cmd = ["lazybuild", "build", EXAMPLE, "--build-arg", f"TOOLCHAIN={toolchain}", "--output",
           f"type=oci,dest={run}/out.tar", "--state-dir", f"{run}/state", "--cache", f"{run}/cache",
           "--metadata-file", meta, "--progress", "quiet"] + (["--insecure"] if insecure else [])
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
    dockerd = wan = None
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
        links = [("loopback", registry.host)]
        if not args.no_wan:
            wan = Wan(os.path.join(work, "registry", "data"), work)
            links.append(("20ms+200mbit", WAN_HOST))
        dockerd = Dockerd(os.path.join(work, "dockerd"), ["--insecure-registry", WAN_HOST])
        rows = []
        for link, host in links:
            toolchain = f"{host}/toolchain:esgz"
            ours, theirs, fetched = [], [], []
            for _ in range(args.repeat):
                t, b = lazy_build(toolchain, work, insecure=host == WAN_HOST)
                ours.append(t)
                fetched.append(b)
                theirs.append(docker_build(dockerd, toolchain))
            rows.append((link, statistics.median(ours), statistics.median(theirs), statistics.median(fetched), ours, theirs))
        print(f"dev-image build, cold, median of {args.repeat}; toolchain {image_bytes / 1e6:.1f} MB compressed:")
        print(f"{'link':14} {'lazybuild build':>16} {'docker build':>13} {'speed-up':>9} {'bytes lazybuild':>16} "
              f"{'bytes docker':>13} {'share':>6}")
        for link, o, d, b, ours, theirs in rows:
            print(f"{link:14} {o:14.2f} s {d:11.2f} s {d / o:8.2f}x {b / 1e6:13.1f} MB {image_bytes / 1e6:10.1f} MB "
                  f"{100 * b / image_bytes:5.1f}%")
            print(f"{'':14} runs: lazybuild {', '.join(f'{t:.2f}' for t in ours)}; docker {', '.join(f'{t:.2f}' for t in theirs)}")
    finally:
        if dockerd:
            dockerd.stop()
        if wan:
            wan.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
