"""`LAZYBUILD_OUTPUT=stargz` inside a real BuildKit (Docker 20.10, BuildKit v0.8): the frontend's export
step writes an OCI layout of eStargz layers as the build result; `lazybuild push oci:DIR` publishes it,
its layers pass the reference's verify, it mounts lazily, and its filesystem is the one BuildKit builds
without the option."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from support.cli_runner import lazybuild
from support.flatten import flatten_docker_save, flatten_oci_tar

DOCKERFILE = """FROM lazybuild-test/python:bookworm AS build
RUN mkdir -p /out && echo compiled > /out/tool && chmod 755 /out/tool
FROM lazybuild-test/python:bookworm
RUN mkdir /app && echo hi > /app/hi && rm -f /etc/motd && ln -s hi /app/link
COPY --from=build /out/tool /usr/local/bin/tool
COPY a.txt b.txt /app/
ENV MODE=stargz
CMD ["cat", "/app/hi"]
"""


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    ctx = tmp_path_factory.mktemp("stargz-ctx")
    (ctx / "a.txt").write_text("a\n" * 100)
    (ctx / "b.txt").write_text("b\n" * 100)
    (ctx / "prio.txt").write_text("app/b.txt\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    return ctx


def _build(dockerd, frontend_image, ctx, *args):
    (ctx / "Dockerfile.lazybuild").write_text(f"# syntax={frontend_image}\n" + DOCKERFILE)
    p = dockerd.build(str(ctx), "-f", str(ctx / "Dockerfile.lazybuild"), *args, check=False)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return p


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_stargz_output_layout_pushes_verifies_mounts_and_matches(dockerd, frontend_image, registry, oracle, context,
                                                                 compression, tmp_path):
    out = tmp_path / "out"
    _build(dockerd, frontend_image, context, "--build-arg", "LAZYBUILD_OUTPUT=stargz", "--build-arg",
           f"LAZYBUILD_COMPRESSION={compression}", "--build-arg", "LAZYBUILD_PRIORITIZED_FILES=prio.txt",
           "--output", f"type=local,dest={out}")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    ref = f"{registry.host}/stargz-output/app:{compression}"
    lazybuild("push", f"oci:{out}", ref)
    info = json.loads(lazybuild("inspect", ref).stdout)
    layers = info["manifest"]["layers"]
    assert len(layers) == 4  # the base as one layer, then RUN, COPY --from, COPY
    want = "application/vnd.oci.image.layer.v1.tar+" + compression
    for layer in layers:
        assert layer["mediaType"] == want
        blob = out / "blobs" / "sha256" / layer["digest"].split(":")[1]
        toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        subprocess.run([oracle, "verify", "-toc", toc, str(blob)], check=True, capture_output=True)
    names = [json.loads(x)["path"] for x in lazybuild("layer", "ls", str(out / "blobs" / "sha256" /
                                                                      layers[3]["digest"].split(":")[1]), "--json").stdout.splitlines()]
    assert names.index("app/b.txt") < names.index(".prefetch.landmark") < names.index("app/a.txt")
    assert info["config"]["config"]["Env"][-1] == "MODE=stargz" and info["config"]["config"]["Cmd"] == ["cat", "/app/hi"]
    assert len(info["config"]["rootfs"]["diff_ids"]) == 4

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(tmp_path / "cache"))
    try:
        assert (mnt / "app" / "hi").read_text() == "hi\n" and os.readlink(mnt / "app" / "link") == "hi"
        assert not (mnt / "etc" / "motd").exists() and (mnt / "usr" / "local" / "bin" / "tool").exists()
    finally:
        lazybuild("umount", str(mnt))

    # The same Dockerfile without the option, built by BuildKit into Docker: the same filesystem.
    tar = tmp_path / "layout.tar"
    _build(dockerd, frontend_image, context, "--build-arg", "LAZYBUILD_OUTPUT=stargz", "--build-arg",
           f"LAZYBUILD_COMPRESSION={compression}", "--output", f"type=tar,dest={tar}")
    _build(dockerd, frontend_image, context, "-t", "stargz-output-plain")
    saved = tmp_path / "saved.tar"
    with open(saved, "wb") as f:
        subprocess.run(["/usr/bin/docker", "save", "stargz-output-plain"], stdout=f, env=dockerd.env(), check=True)
    ours_cfg, ours = flatten_oci_tar(str(tar))
    theirs_cfg, theirs = flatten_docker_save(str(saved))
    assert ours_cfg["config"] == theirs_cfg["config"]
    changed = sorted(p for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p))
    assert not changed, [(p, ours.get(p), theirs.get(p)) for p in changed[:20]]


def test_unknown_output_is_refused(dockerd, frontend_image, context):
    (context / "Dockerfile.lazybuild").write_text(f"# syntax={frontend_image}\n" + DOCKERFILE)
    p = dockerd.build(str(context), "-f", str(context / "Dockerfile.lazybuild"), "--build-arg", "LAZYBUILD_OUTPUT=squashfs",
                      check=False)
    assert p.returncode != 0 and b"LAZYBUILD_OUTPUT=squashfs" in p.stderr


def test_registry_base_layers_are_kept_or_converted(dockerd, frontend_image, registry, tmp_path):
    """A base image that lives in a registry keeps its own layers (fetched by digest by the export
    step); LAZYBUILD_CONVERT_BASE=1 turns it into one eStargz layer instead."""
    base = f"{registry.host}/stargz-base/python:bookworm"
    dockerd.docker("tag", "lazybuild-test/python:bookworm", base)
    dockerd.docker("push", base)
    dockerd.docker("rmi", base)  # BuildKit resolves it in the registry, to a digest
    base_layers = json.loads(lazybuild("inspect", base).stdout)["manifest"]["layers"]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"# syntax={frontend_image}\nFROM {base}\nRUN echo x > /x\n")
    for convert, out in (("0", tmp_path / "kept"), ("1", tmp_path / "converted")):
        p = dockerd.build(str(ctx), "--build-arg", "LAZYBUILD_OUTPUT=stargz", "--build-arg",
                          f"LAZYBUILD_CONVERT_BASE={convert}", "--output", f"type=local,dest={out}", check=False)
        assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
        ref = f"{registry.host}/stargz-base/app:{out.name}"
        lazybuild("push", f"oci:{out}", ref)
        layers = json.loads(lazybuild("inspect", ref).stdout)["manifest"]["layers"]
        assert len(layers) == len(base_layers) + 1  # the base's layers (kept or as one), then the RUN
        same = [a["digest"] == b["digest"] for a, b in zip(layers, base_layers)]
        assert all(same) if convert == "0" else not any(same)
