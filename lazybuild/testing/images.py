"""Images for tests, benches and examples: a Debian root filesystem from debootstrap (cached between runs,
in LAZYBUILD_TEST_CACHE or /var/cache/lazybuild-test) and `docker save`-style archives made from layer tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

CACHE = os.environ.get("LAZYBUILD_TEST_CACHE", "/var/cache/lazybuild-test")
DEFAULT_PACKAGES = ("python3", "gcc", "libc6-dev")


def debootstrap_rootfs(packages: tuple[str, ...] = DEFAULT_PACKAGES, suite: str = "bookworm") -> str:
    """A tar of `debootstrap --variant=minbase --include=PACKAGES SUITE`, made once and kept in CACHE,
    keyed by the package list."""
    key = hashlib.sha256(f"{suite}:{','.join(sorted(packages))}".encode()).hexdigest()[:12]
    tar = os.path.join(CACHE, f"rootfs-{suite}-minbase-{key}.tar")
    if os.path.exists(tar):
        return tar
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE)
    try:
        root = os.path.join(work, "root")
        cmd = ["debootstrap", "--variant=minbase"] + ([f"--include={','.join(packages)}"] if packages else []) + [suite, root]
        subprocess.run(cmd, check=True, capture_output=True)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):  # downloaded .debs are not part of an image
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", root, "-cf", tar + ".partial", "."],
                       check=True)
        os.replace(tar + ".partial", tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, path: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    if path is not None:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tf.addfile(info, f)
    else:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def docker_archive(layer_tars: list[str], out: str, tag: str = "test:latest", cmd: list[str] | None = None) -> str:
    """What `docker save` writes for an image of these (uncompressed) layer tars."""
    diff_ids = [_sha256_file(p) for p in layer_tars]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": cmd or ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layer_tars))],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(out + ".partial", "w") as tf:
        _add(tf, config_name, config)
        for i, p in enumerate(layer_tars):
            _add(tf, f"{i}/layer.tar", path=p)
        _add(tf, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [tag],
                                                "Layers": [f"{i}/layer.tar" for i in range(len(layer_tars))]}]).encode())
    os.replace(out + ".partial", out)
    return out
