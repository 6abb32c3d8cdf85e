#!/usr/bin/env python3
"""Pull the same image from a local registry with `lazybuild pull` and with `skopeo copy`, in one run.

The image is a Debian root filesystem (debootstrap minbase + python3 + gcc, ~380 MB, cached under
/var/cache/lazybuild-test), pushed as is (an uncompressed layer, as `docker save` has it) and as
converted eStargz. Prints seconds per tool and the ratio
skopeo / lazybuild (goal >= 1x: we are at least as fast).

    python3 bench/pull.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CI": "1"})
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for tool in ("lazybuild", "skopeo", "debootstrap", "docker-registry"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (bash scripts/setup.sh)")
    work = tempfile.mkdtemp(prefix="lazybuild-bench-pull-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    try:
        rootfs = debootstrap_rootfs()
        archive = docker_archive([rootfs], os.path.join(work, "image.tar"))
        size_mb = os.path.getsize(rootfs) / 1e6
        plain, esgz = f"{registry.host}/bench/image:plain", f"{registry.host}/bench/image:esgz"
        subprocess.run(["lazybuild", "push", f"docker-archive:{archive}", plain], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["lazybuild", "convert", plain, esgz], check=True, stdout=subprocess.DEVNULL)
        print(f"image: {size_mb:.0f} MB uncompressed, one layer; median of {args.repeat} runs each")
        print(f"{'image':8} {'lazybuild pull':>15} {'skopeo copy':>12} {'skopeo/lazybuild':>17}")
        for name, ref in (("plain", plain), ("eStargz", esgz)):
            ours, theirs = [], []
            for i in range(args.repeat):
                d1, d2 = os.path.join(work, f"o{i}"), os.path.join(work, f"s{i}")
                ours.append(timed(["lazybuild", "pull", ref, f"oci:{d1}:x"]))
                theirs.append(timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{d2}:x"]))
                shutil.rmtree(d1)
                shutil.rmtree(d2)
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{name:8} {a:14.2f}s {b:11.2f}s {b / a:16.2f}x")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
