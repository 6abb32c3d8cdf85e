"""Issue 16's image commands against the real docker-registry: `copy`/`pull`/`push` and their directions,
oci-archive in and out (checked with skopeo), `inspect` and `mount` of layouts and archives (the mount lazy:
served through lazybuild.localregistry), and `lazybuild optimize` end to end on a Debian image (the workload's
files before `.prefetch.landmark`, every layer accepted by `estargz-oracle verify -toc`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import subprocess
import time

import pytest

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.cli_runner import lazybuild


def _json(p) -> dict:
    return json.loads(p.stdout)


def test_copy_pull_push_and_their_directions(registry, archive, tmp_path):
    plain = f"{registry.host}/transports/plain:v1"
    assert _json(lazybuild("push", "--format", "json", f"docker-archive:{archive}", plain))["destination"] == plain
    src = f"{registry.host}/transports/app:v1"  # an OCI manifest (skopeo's oci transports read no other)
    pushed = _json(lazybuild("convert", "--format", "json", plain, src))

    # registry -> registry is `copy` (pull and push refuse it, naming copy)
    for verb in ("pull", "push"):
        p = lazybuild(verb, src, f"{registry.host}/transports/copy:v1", ok=False)
        assert p.returncode == 2 and "lazybuild copy" in p.stderr
    copied = _json(lazybuild("copy", "--format", "json", src, f"docker://{registry.host}/transports/copy:v1"))
    assert copied["digest"] == pushed["digest"]

    # pull into an OCI tar; push it back from there; the wrong verbs say which one to use
    p = lazybuild("pull", f"oci-archive:{tmp_path}/x.tar", src, ok=False)
    assert p.returncode == 2 and f"lazybuild push oci-archive:{tmp_path}/x.tar {src}" in p.stderr
    pulled = _json(lazybuild("pull", "--format", "json", src, f"oci-archive:{tmp_path}/app.tar:v1"))
    assert pulled["digest"] == pushed["digest"]
    p = lazybuild("push", src, f"oci-archive:{tmp_path}/y.tar", ok=False)
    assert p.returncode == 2 and f"lazybuild pull {src} oci-archive:{tmp_path}/y.tar" in p.stderr
    assert not os.path.exists(tmp_path / "x.tar") and not os.path.exists(tmp_path / "y.tar")

    back = f"{registry.host}/transports/back:v1"
    assert _json(lazybuild("push", "--format", "json", f"oci-archive:{tmp_path}/app.tar:v1", back))["digest"] == pushed["digest"]
    assert _json(lazybuild("inspect", "--format", "json", back))["digest"] == pushed["digest"]

    # skopeo reads our OCI tar, and we read skopeo's
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci-archive:{tmp_path}/app.tar:v1"], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["Digest"] == pushed["digest"]
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{src}", f"oci-archive:{tmp_path}/skopeo.tar:s"],
                   check=True, capture_output=True)
    theirs = _json(lazybuild("inspect", "--format", "json", f"oci-archive:{tmp_path}/skopeo.tar:s"))
    assert theirs["config"]["rootfs"] == _json(lazybuild("inspect", "--format", "json", src))["config"]["rootfs"]
    again = _json(lazybuild("copy", "--format", "json", f"oci-archive:{tmp_path}/skopeo.tar:s", f"oci:{tmp_path}/from-skopeo:s"))
    assert again["digest"] == theirs["digest"]

    # skopeo's dir: both ways, through the registry
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{src}", f"dir:{tmp_path}/skopeo-dir"],
                   check=True, capture_output=True)
    from_dir = f"{registry.host}/transports/from-dir:v1"
    assert _json(lazybuild("push", "--format", "json", f"dir:{tmp_path}/skopeo-dir", from_dir))["digest"] == pushed["digest"]
    assert _json(lazybuild("pull", "--format", "json", from_dir, f"dir:{tmp_path}/our-dir"))["digest"] == pushed["digest"]
    info = json.loads(subprocess.run(["skopeo", "inspect", f"dir:{tmp_path}/our-dir"], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["Digest"] == pushed["digest"]


def _mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture(scope="module")
def big_archive(tars, tmp_path_factory) -> str:
    """Two layers: the all-types tar, then 8 MiB of random bytes in one file (read lazily or not at all)."""
    d = tmp_path_factory.mktemp("big")
    big = str(d / "big.tar")
    with tarfile.open(big, "w") as tf:
        data = os.urandom(8 << 20)
        info = tarfile.TarInfo("big/random")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return docker_archive([tars["ustar"], big], str(d / "image.tar"))


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive", "dir"])
def test_mount_and_inspect_local_images(big_archive, tmp_path, kind):
    archive = big_archive
    if kind == "docker-archive":
        image = f"docker-archive:{archive}"  # not eStargz: converted once at mount, as from a registry
    else:
        lazybuild("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/esgz:v1", "--estargz-chunk-size", "4KiB")
        image = f"oci:{tmp_path}/esgz:v1"
        if kind == "oci-archive":
            lazybuild("copy", image, f"oci-archive:{tmp_path}/esgz.tar:v1")
            image = f"oci-archive:{tmp_path}/esgz.tar:v1"
        elif kind == "dir":  # copied into a temporary layout at mount, then served as lazily as a layout
            lazybuild("copy", image, f"dir:{tmp_path}/esgz-dir")
            image = f"dir:{tmp_path}/esgz-dir"
    inspected = _json(lazybuild("inspect", "--format", "json", image))
    assert inspected["reference"] == image and len(inspected["manifest"]["layers"]) == 2

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", image, str(mnt), "--cache", str(tmp_path / "cache"), "--no-prefetch",
              "--no-background-fetch")
    try:
        assert (mnt / "etc/hello.txt").read_bytes() == b"hello world\n"
        status = _json(lazybuild("mount", "--status", "--format", "json", str(mnt)))
        if kind != "docker-archive":  # lazy: the big layer's tail (footer and TOC), not its 8 MiB
            top = status["layers"][1]
            assert top["size"] > 8 << 20 and 0 < top["fetchedBytes"] <= 512 << 10, top
        with open(mnt / "big/random", "rb") as f:
            f.seek(5 << 20)
            assert len(f.read(4096)) == 4096
        if kind != "docker-archive":  # one chunk (4 KiB) and its window, verified, still not the layer
            top = _json(lazybuild("mount", "--status", "--format", "json", str(mnt)))["layers"][1]
            assert top["fetchedBytes"] < 2 << 20, top
    finally:
        lazybuild("umount", str(mnt))
    for _ in range(100):
        if not _mounted(mnt):
            break
        time.sleep(0.05)
    assert not _mounted(mnt)


WORKLOAD_FILES = ["etc/debian_version", "usr/share/common-licenses/GPL-3", "etc/os-release"]


@pytest.fixture(scope="module")
def debian_image(registry, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("optimize")
    ref = f"{registry.host}/optimize/debian:plain"
    archive = docker_archive([debootstrap_rootfs()], str(d / "debian.tar"), cmd=["/bin/true"])
    lazybuild("push", f"docker-archive:{archive}", ref)
    return ref


def _blobs_and_tocs(image: str, where) -> list[tuple[str, str]]:
    lazybuild("copy", image, f"oci:{where}")
    info = _json(lazybuild("inspect", "--format", "json", f"oci:{where}"))
    return [(str(where / "blobs/sha256" / layer["digest"][7:]), layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"])
            for layer in info["manifest"]["layers"]]


def _before_landmark(blob: str) -> list[str]:
    listing = [e["path"] for e in
               json.loads(lazybuild("layer", "ls", "--format", "json", blob).stdout)]
    assert ".prefetch.landmark" in listing, listing[:20]
    return listing[:listing.index(".prefetch.landmark")]


def test_optimize_an_existing_image(debian_image, registry, oracle, tmp_path):
    dst = f"{registry.host}/optimize/debian:opt"
    # the workload's own environment and directory: $FIRST and a relative path name two of the files
    cmd = "cat $FIRST common-licenses/GPL-3 /etc/os-release > /dev/null"
    p = lazybuild("optimize", "--format", "json", debian_image, dst, "--period", "30", "--record-out", str(tmp_path / "record.ndjson"),
                  "--env", "FIRST=/etc/debian_version", "--cwd", "/usr/share", "--", "/bin/sh", "-c", cmd)
    out = _json(p)
    assert out["destination"] == dst and out["filesRead"]["0"] >= len(WORKLOAD_FILES)
    assert _json(lazybuild("inspect", "--format", "json", dst))["digest"] == out["digest"]

    ((blob, toc),) = _blobs_and_tocs(dst, tmp_path / "opt")
    subprocess.run([oracle, "verify", "-toc", toc, blob], check=True, capture_output=True)
    first = _before_landmark(blob)
    for f in WORKLOAD_FILES + ["usr/bin/cat"]:
        assert f in first, (f, first)
    assert "usr/bin/gcc-12" not in first and len(first) < 100  # only what the workload read (and its parents)

    # the record it wrote is what `convert --estargz-record-in` takes: the same order again
    recorded = [json.loads(line)["path"] for line in (tmp_path / "record.ndjson").read_text().splitlines()]
    assert [p for p in first if p in recorded] == recorded


def test_optimize_a_local_layout_with_its_own_cmd(debian_image, oracle, tmp_path):
    lazybuild("pull", debian_image, f"oci:{tmp_path}/plain:v1")
    # the image's CMD is /bin/true; the config says nothing else, so the workload is `true` alone
    out = _json(lazybuild("optimize", "--format", "json", f"oci:{tmp_path}/plain:v1", f"oci-archive:{tmp_path}/opt.tar:v1",
                          "--period", "20", "--zstdchunked"))
    assert out["filesRead"]["0"] > 0
    info = _json(lazybuild("inspect", "--format", "json", f"oci-archive:{tmp_path}/opt.tar:v1"))
    assert info["manifest"]["layers"][0]["mediaType"].endswith("+zstd")
    ((blob, toc),) = _blobs_and_tocs(f"oci-archive:{tmp_path}/opt.tar:v1", tmp_path / "out")
    subprocess.run([oracle, "verify", "-toc", toc, blob], check=True, capture_output=True)
    first = _before_landmark(blob)
    assert "usr/bin/true" in first and "etc/debian_version" not in first
