"""The package as users install it: a wheel in a fresh venv works from any directory.

The repository root holds a folder named `lazybuild` (the core package's source, without the
components that live beside it), so anything that runs `python -m lazybuild...` with the root as its
current directory would import that folder instead of the installed package. The builder and the
mounter never start such a process; this test proves it with the wheel installed normally.
"""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from lazybuild.testing.images import docker_archive
from support import REPO
from support.cli_runner import lazybuild


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> str:
    """A venv holding only the wheel built from this checkout; its dependencies come from this
    interpreter's site-packages by path (a .pth line), so the editable install here is not seen."""
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", REPO,
                    "-w", str(d / "dist")], check=True)
    wheel = glob.glob(str(d / "dist" / "lazybuild-*.whl"))[0]
    env = str(d / "venv")
    subprocess.run([sys.executable, "-m", "venv", env], check=True)
    py = os.path.join(env, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "zz-host-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", wheel],
                   check=True)
    return env


def test_the_wheel_holds_every_package(venv):
    """Packages are found, not listed: every folder with an __init__.py is in the wheel."""
    wheel = glob.glob(os.path.join(os.path.dirname(venv), "dist", "lazybuild-*.whl"))[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, name in (("lazybuild", "lazybuild"), ("builder", "lazybuild/builder"),
                         ("exporter", "lazybuild/exporter"), ("frontend", "lazybuild/frontend"),
                         ("mounter", "lazybuild/mounter"), ("snapshotter", "lazybuild/snapshotter")):
        for init in glob.glob(os.path.join(REPO, folder, "**", "__init__.py"), recursive=True):
            rel = os.path.relpath(init, os.path.join(REPO, folder))
            assert f"{name}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    assert "lazybuild/frontend/llb/proto/ops_pb2.py" in names and "lazybuild/snapshotter/proto/snapshots_pb2.py" in names


def test_build_and_mount_from_the_repository_root(venv, registry, tmp_path):
    layer = str(tmp_path / "layer.tar")
    data = b"hello from a lazily mounted image\n"
    with tarfile.open(layer, "w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    ref = f"{registry.host}/packaging/hello:latest"
    lazybuild("convert", f"docker-archive:{docker_archive([layer], str(tmp_path / 'img.tar'))}", ref)
    exe = os.path.join(venv, "bin", "lazybuild")
    env = {**os.environ, "CI": "1", "PATH": os.path.join(venv, "bin") + ":" + os.environ["PATH"]}

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run([exe, "mount", ref, str(mnt), "--daemon", "--cache", str(tmp_path / "cache")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    try:
        assert (mnt / "hello.txt").read_bytes() == data
    finally:
        subprocess.run([exe, "umount", str(mnt)], cwd=REPO, env=env, check=True, timeout=60)

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM scratch\nCOPY --from={ref} /hello.txt /copied.txt\n")
    out = tmp_path / "out.tar"
    p = subprocess.run([exe, "build", "--progress", "plain", "--state-dir", str(tmp_path / "state"),
                        "--output", f"type=tar,dest={out}", str(ctx)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with tarfile.open(out) as tf:
        assert tf.extractfile("./copied.txt").read() == data
