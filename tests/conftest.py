"""Shared fixtures: the reference checker, the input tars and the local services, made once per session;
and the `integration` mark, given by folder (tests/integration/ has it, tests/unit/ must not)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import subprocess

import pytest

from lazybuild.testing.images import docker_archive
from lazybuild.testing.registry import RegistryProcess
from support import SHARED, TESTS, tarcases


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = os.path.relpath(str(item.path), TESTS).split(os.sep)[0]
        if folder == "integration":
            item.add_marker(pytest.mark.integration)
        elif folder == "unit" and item.get_closest_marker("integration"):
            raise pytest.UsageError(f"{item.nodeid} is marked integration: tests that need services go in "
                                    "tests/integration/")


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
    from lazybuild.testing.dockerd import start_with_base

    d = start_with_base(str(tmp_path_factory.mktemp("dockerd")))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def frontend_image(dockerd, registry) -> str:
    """The frontend image, pushed to the local registry (see lazybuild.testing.dockerd.push_frontend_image)."""
    from lazybuild.testing.dockerd import push_frontend_image

    return push_frontend_image(dockerd, f"{registry.host}/lazybuild:test")


@pytest.fixture
def canary():
    """A host tree outside the test's roots (see support/canary.py); checked untouched after the test."""
    from support.canary import Canary

    c = Canary()
    yield c
    try:
        c.check()
    finally:
        c.remove()
