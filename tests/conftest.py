"""Shared fixtures: the reference checker and the input tars, made once per session."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tarcases  # noqa: E402
from images import docker_archive  # noqa: E402
from registry_harness import RegistryProcess  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(REPO, "..", "shared"))


@pytest.fixture(scope="session")
def oracle(tmp_path_factory) -> str:
    """`estargz-oracle`: upstream stargz-snapshotter's estargz library (Debian 0.12) as a command.

    scripts/setup.sh installs it; without it the session builds it (needs Go + the Debian package).
    """
    found = shutil.which("estargz-oracle")
    if found:
        return found
    out = str(tmp_path_factory.mktemp("oracle") / "estargz-oracle")
    subprocess.run(["bash", os.path.join(SHARED, "tools/estargz-oracle/build.sh"), out], check=True)
    return out


@pytest.fixture(scope="session")
def tars(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tars")
    return {name: make(str(d / f"{name}.tar"), str(d / f"{name}-work")) for name, make in tarcases.CASES.items()}


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    r = RegistryProcess(str(tmp_path_factory.mktemp("registry")))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def archive(tmp_path_factory, tars) -> str:
    """A `docker save`-style archive: two layers (the all-types tar, then one with a whiteout)."""
    d = tmp_path_factory.mktemp("archive")
    top = str(d / "top.tar")
    with tarfile.open(top, "w") as tf:
        for name, data in (("etc/.wh.empty", b""), ("etc/motd", b"hello from the top layer\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return docker_archive([tars["ustar"], top], str(d / "image.tar"))


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory):
    """A Docker 20.10 daemon of our own (BuildKit v0.8 inside) with the test base image imported."""
    from dockerd_harness import start_with_base

    d = start_with_base(str(tmp_path_factory.mktemp("dockerd")))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def frontend_image(dockerd, registry) -> str:
    """The frontend image, pushed to the local registry (see dockerd_harness.push_frontend_image)."""
    from dockerd_harness import push_frontend_image

    return push_frontend_image(dockerd, f"{registry.host}/lazybuild:test")


@pytest.fixture
def canary():
    """A host tree outside the test's roots (see canary.py); checked untouched after the test."""
    from canary import Canary

    c = Canary()
    yield c
    try:
        c.check()
    finally:
        c.remove()
