"""`LAZYBUILD_OUTPUT=stargz` inside a real BuildKit (Docker 20.10, BuildKit v0.8): the frontend's export
step writes an OCI layout of eStargz layers as the build result; `lazybuild push oci:DIR` publishes it,
its layers pass the reference's verify, it mounts lazily, and its filesystem is the one BuildKit builds
without the option."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess

import pytest

from lazybuild.estargz import TOC_DIGEST_ANNOTATION
from lazybuild.layout import OCILayout
from lazybuild.registry import Reference
from lazybuild.testing.registry import RegistryProcess, make_htpasswd
from lazybuild.transfer import ConvertOptions, OCISource, RegistryDest, RegistrySource, copy_image
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
    info = json.loads(lazybuild("inspect", "--format", "json", ref).stdout)
    layers = info["manifest"]["layers"]
    assert len(layers) == 4  # the base as one layer, then RUN, COPY --from, COPY
    want = "application/vnd.oci.image.layer.v1.tar+" + compression
    for layer in layers:
        assert layer["mediaType"] == want
        blob = out / "blobs" / "sha256" / layer["digest"].split(":")[1]
        toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        subprocess.run([oracle, "verify", "-toc", toc, str(blob)], check=True, capture_output=True)
    names = [x["path"] for x in json.loads(lazybuild("layer", "ls", str(out / "blobs" / "sha256" /
                                                                      layers[3]["digest"].split(":")[1]), "--format", "json").stdout)]
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


# --- a base image in a registry: its layers kept or converted to eStargz one by one -----------------------

BASE_DOCKERFILE = """FROM lazybuild-test/python:bookworm
RUN mkdir -p /opt/base && echo two > /opt/base/two
"""


def _registry_image(ref: str):
    """(manifest, config) of REF in its registry."""
    source = RegistrySource(Reference.parse(ref))
    try:
        [(manifest, _)] = source.manifests(None, False)
        return manifest, json.loads(source.read(manifest.config))
    finally:
        source.close()


@pytest.fixture(scope="module")
def gzip_base(dockerd, registry, tmp_path_factory):
    """A two-layer Debian image as Docker pushes it: gzip layers in a Docker schema 2 manifest, no
    annotations. Removed from the daemon's store, so BuildKit resolves it in the registry, to a digest."""
    ctx = tmp_path_factory.mktemp("gzip-base")
    (ctx / "Dockerfile").write_text(BASE_DOCKERFILE)
    ref = f"{registry.host}/stargz-base/gzip:1"
    dockerd.build(str(ctx), "-t", ref)
    dockerd.docker("push", ref)
    dockerd.docker("rmi", ref)
    manifest, config = _registry_image(ref)
    assert len(manifest.layers) == 2
    assert all(TOC_DIGEST_ANNOTATION not in d.annotations and d.media_type.endswith("gzip") for d in manifest.layers)
    return ref, manifest, config


def _build_on(dockerd, frontend_image, base: str, out, *args) -> subprocess.CompletedProcess:
    ctx = out.parent / (out.name + "-ctx")
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"# syntax={frontend_image}\nFROM {base}\nRUN echo x > /x\n")
    return dockerd.build(str(ctx), "--build-arg", "LAZYBUILD_OUTPUT=stargz", *args, "--output", f"type=local,dest={out}",
                         check=False)


def _result(out):
    """(manifest, config, blob path of a digest) of the build's OCI layout."""
    layout = OCILayout(str(out))
    [(manifest, _)] = layout.manifests_for("latest")
    return manifest, json.loads(layout.read_blob(manifest.config.digest)), layout.blob_path


def _diff_id(path: str) -> str:
    h = hashlib.sha256()
    with gzip.open(path) as f:  # every member: eStargz is a gzip stream of many
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _created_by(config) -> list[str]:
    return [h.get("created_by", "") for h in config["history"]]


def test_a_gzip_base_is_converted_layer_by_layer(dockerd, frontend_image, registry, oracle, gzip_base, tmp_path):
    """The default: every base layer that is not eStargz is fetched by digest and converted; the result is
    eStargz throughout (the reference's verify accepts each layer), diff_ids are those of the blobs, the
    base's history stays, and the image mounts lazily, layer by layer."""
    base_ref, base_manifest, base_config = gzip_base
    out = tmp_path / "out"
    p = _build_on(dockerd, frontend_image, base_ref, out)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert b"0 layers kept, 2 converted to eStargz" in p.stderr
    manifest, config, blob_path = _result(out)
    assert len(manifest.layers) == len(base_manifest.layers) + 1
    for layer, diff_id in zip(manifest.layers, config["rootfs"]["diff_ids"]):
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
        blob = blob_path(layer.digest)
        subprocess.run([oracle, "verify", "-toc", layer.annotations[TOC_DIGEST_ANNOTATION], blob], check=True,
                       capture_output=True)
        assert _diff_id(blob) == diff_id
    assert not {d.digest for d in manifest.layers} & {d.digest for d in base_manifest.layers}
    assert _created_by(config)[:-1] == _created_by(base_config) and "echo x > /x" in _created_by(config)[-1]
    assert config["config"]["Env"] == base_config["config"]["Env"]

    ref = f"{registry.host}/stargz-base/app:converted"
    copy_image(OCISource(str(out), "latest"), RegistryDest(Reference.parse(ref)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(tmp_path / "cache"), "--no-background-fetch")
    try:
        assert (mnt / "opt" / "base" / "two").read_text() == "two\n" and (mnt / "x").read_text() == "x\n"
        assert (mnt / "usr" / "bin" / "python3").exists()
        status = json.loads(lazybuild("mount", "--status", "--format", "json", str(mnt)).stdout)["layers"]
        assert [layer["lazy"] for layer in status] == [True] * 3, status
        debian = status[0]
        assert debian["fetchedBytes"] < 0.5 * debian["size"], debian  # read lazily: a part of the base
    finally:
        lazybuild("umount", str(mnt))


def test_an_estargz_base_keeps_its_layers(dockerd, frontend_image, registry, gzip_base, tmp_path):
    """A base converted by `lazybuild convert` (TOC digest annotations in an OCI manifest): its layers are
    kept by digest, byte for byte, with their annotations."""
    esgz_ref = f"{registry.host}/stargz-base/esgz:1"
    copy_image(RegistrySource(Reference.parse(gzip_base[0])), RegistryDest(Reference.parse(esgz_ref)),
               convert=ConvertOptions())
    esgz_manifest, _ = _registry_image(esgz_ref)
    out = tmp_path / "out"
    p = _build_on(dockerd, frontend_image, esgz_ref, out)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert b"2 layers kept, 0 converted to eStargz" in p.stderr
    manifest, config, _ = _result(out)
    assert manifest.layers[:2] == esgz_manifest.layers and len(manifest.layers) == 3
    assert TOC_DIGEST_ANNOTATION in manifest.layers[2].annotations


def test_convert_base_0_keeps_gzip_layers_and_a_mixed_base_converts_only_those(
        dockerd, frontend_image, registry, oracle, gzip_base, tmp_path):
    """LAZYBUILD_CONVERT_BASE=0: the base's gzip layers are kept by digest (the result is eStargz only above
    the base). That result, pushed, is a mixed base: built on by default, its gzip layers are converted
    (to the same blobs as a gzip base's) and its eStargz layer is kept."""
    base_ref, base_manifest, _ = gzip_base
    kept = tmp_path / "kept"
    p = _build_on(dockerd, frontend_image, base_ref, kept, "--build-arg", "LAZYBUILD_CONVERT_BASE=0")
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    manifest, config, blob_path = _result(kept)
    assert [d.digest for d in manifest.layers[:2]] == [d.digest for d in base_manifest.layers]
    assert all(TOC_DIGEST_ANNOTATION not in d.annotations for d in manifest.layers[:2])
    assert TOC_DIGEST_ANNOTATION in manifest.layers[2].annotations
    assert [_diff_id(blob_path(d.digest)) for d in manifest.layers] == config["rootfs"]["diff_ids"]

    mixed_ref = f"{registry.host}/stargz-base/mixed:1"
    copy_image(OCISource(str(kept), "latest"), RegistryDest(Reference.parse(mixed_ref)))
    out = tmp_path / "out"
    p = _build_on(dockerd, frontend_image, mixed_ref, out)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert b"1 layers kept, 2 converted to eStargz" in p.stderr
    result, result_config, blob_path = _result(out)
    assert len(result.layers) == 4 and result.layers[2] == manifest.layers[2]  # the eStargz one, as it was
    assert all(TOC_DIGEST_ANNOTATION in d.annotations for d in result.layers)
    for layer in result.layers:
        subprocess.run([oracle, "verify", "-toc", layer.annotations[TOC_DIGEST_ANNOTATION], blob_path(layer.digest)],
                       check=True, capture_output=True)
    assert [_diff_id(blob_path(d.digest)) for d in result.layers] == result_config["rootfs"]["diff_ids"]
    assert not {d.digest for d in result.layers[:2]} & {d.digest for d in base_manifest.layers}


def test_a_private_base_says_what_works(dockerd, frontend_image, gzip_base, tmp_path):
    """A base behind credentials: BuildKit pulls it with the client's `docker login`, but the export step
    has no credentials: the build fails saying so and what to do. With the base pulled into the daemon
    first, the export step makes it one eStargz layer from the daemon's copy, without the registry."""
    work = str(tmp_path / "private-registry")
    os.makedirs(work)
    private = RegistryProcess(work, htpasswd=make_htpasswd(work, "alice", "s3cret"))
    ref = f"{private.host}/team/base:1"
    try:
        dockerd.docker("login", "-u", "alice", "--password-stdin", private.host, input=b"s3cret")
        dockerd.docker("pull", gzip_base[0])
        dockerd.docker("tag", gzip_base[0], ref)
        dockerd.docker("push", ref)
        dockerd.docker("rmi", ref, gzip_base[0])
        for convert in ("1", "0"):
            p = _build_on(dockerd, frontend_image, ref, tmp_path / f"refused-{convert}", "--build-arg",
                          f"LAZYBUILD_CONVERT_BASE={convert}")
            err = p.stderr.decode(errors="replace")
            assert p.returncode != 0 and "its registry asks for credentials" in err, err[-3000:]
            assert f"docker pull {private.host}/team/base" in err

        dockerd.docker("pull", ref)
        out = tmp_path / "pulled"
        p = _build_on(dockerd, frontend_image, ref, out)
        assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
        manifest, config, _ = _result(out)
        assert len(manifest.layers) == 2 and all(TOC_DIGEST_ANNOTATION in d.annotations for d in manifest.layers)
        assert _created_by(config)[-2] == "lazybuild: the base image as one eStargz layer"
    finally:
        dockerd.docker("rmi", ref, check=False)
        dockerd.docker("logout", private.host, check=False)
        private.stop()
