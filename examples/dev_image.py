#!/usr/bin/env python3
"""The dev-image demo, end to end on one machine with no daemon:

1. a local registry (Debian docker-registry on 127.0.0.1);
2. a toolchain image (Debian bookworm + gcc, make, python3: debootstrap, cached) pushed and converted
   to eStargz;
3. `lazybuild build` of examples/dev-image: the compile runs on the toolchain mounted lazily, the result
   (one static binary) is pushed as optimized eStargz;
4. the result is mounted lazily and run; the bytes fetched from the toolchain are printed against its size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess

here = os.path.dirname(os.path.abspath(__file__))
TOOLCHAIN_PACKAGES = ("python3", "gcc", "libc6-dev", "make")


def sh(*cmd: str) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True)


def main() -> int:
    work = tempfile.mkdtemp(prefix="lazybuild-dev-image-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    mnt = os.path.join(work, "app")
    mounted = False
    try:
        print(f"== registry at {registry.host}; toolchain: debootstrap bookworm + {', '.join(TOOLCHAIN_PACKAGES)} "
              "(cached after the first run)", flush=True)
        rootfs = debootstrap_rootfs(TOOLCHAIN_PACKAGES)
        archive = docker_archive([rootfs], os.path.join(work, "toolchain.tar"), cmd=["/bin/bash"])
        plain, esgz = f"{registry.host}/toolchain:plain", f"{registry.host}/toolchain:esgz"
        sh("lazybuild", "push", f"docker-archive:{archive}", plain)
        sh("lazybuild", "convert", plain, esgz)
        os.unlink(archive)
        app = f"{registry.host}/dev-image/app:latest"
        meta = os.path.join(work, "build.json")
        print("== lazybuild build: the compile runs on the toolchain mounted lazily", flush=True)
        sh("lazybuild", "build", os.path.join(here, "dev-image"), "--build-arg", f"TOOLCHAIN={esgz}", "-t", app,
           "--output", "type=stargz,push=true", "--optimize", "--optimize-period", "3",
           "--state-dir", os.path.join(work, "state"), "--cache", os.path.join(work, "cache"),
           "--metadata-file", meta, "--progress", "plain")
        print("== the result, mounted lazily and run", flush=True)
        os.makedirs(mnt)
        sh("lazybuild", "mount", "--daemon", app, mnt, "--cache", os.path.join(work, "cache2"))
        mounted = True
        sh("chroot", mnt, "/app")
        with open(meta) as f:
            fetched = json.load(f)["bytesFetched"]
        for ref, f in fetched.items():
            print(f"== toolchain {ref.split('@')[0]}: {f['fetched'] / 1e6:.1f} MB fetched lazily of "
                  f"{f['size'] / 1e6:.1f} MB ({100 * f['fetched'] / f['size']:.1f}%)", flush=True)
        return 0
    finally:
        if mounted:
            subprocess.run(["lazybuild", "umount", mnt], capture_output=True)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
