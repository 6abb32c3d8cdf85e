"""The registry client and `lazybuild pull/push/convert/inspect` against real registries (Debian
docker-registry): plain HTTP, TLS + htpasswd, token auth, and a fault-injecting proxy."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess

import pytest
import zstandard

from lazybuild.image import Platform
from lazybuild.registry import Credentials, Reference, Registry, RegistryError
from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess, docker_config, make_htpasswd, make_tls
from support.cli_runner import lazybuild
from support.registry import FaultProxy, TokenIssuer


@pytest.fixture(scope="session")
def pushed(registry, archive) -> str:
    ref = f"{registry.host}/test/base:v1"
    lazybuild("push", f"docker-archive:{archive}", ref)
    return ref


def _decompress(blob: bytes) -> bytes:
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    return gzip.decompress(blob)


def _decompress_layout(root: str, tag: str) -> None:
    from lazybuild.image import OCI_LAYER, Descriptor, Manifest
    from lazybuild.layout import OCILayout

    layout = OCILayout(root)
    (manifest, _), = layout.manifests_for(tag)
    layers = []
    for d in manifest.layers:
        raw = _decompress(layout.read_blob(d.digest))
        layers.append(Descriptor(OCI_LAYER, layout.put_bytes(raw), len(raw)))
    plain = Manifest.build(manifest.config, layers)
    layout.put_bytes(plain.raw)
    layout.add_to_index(plain.descriptor(), "plain")


def _unpack(layout_ref: str, dest: str) -> dict[str, str]:
    subprocess.run(["umoci", "unpack", "--rootless", "--image", layout_ref, dest], check=True, capture_output=True)
    out = {}
    root = os.path.join(dest, "rootfs")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in (".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"):
                continue
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isfile(full):
                out[rel] = hashlib.sha256(open(full, "rb").read()).hexdigest()
            else:
                out[rel] = "dir" if os.path.isdir(full) else "special"
    return out


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_convert_round_trip(registry, pushed, oracle, tmp_path, compression):
    dst = f"{registry.host}/test/base:{compression}"
    lazybuild("convert", pushed, dst, *(["--zstdchunked"] if compression == "zstd" else []))
    info = json.loads(lazybuild("inspect", "--format", "json", dst).stdout)
    manifest, config = info["manifest"], info["config"]
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert len(config["history"]) == 2
    with Registry(registry.host) as reg:
        for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
            assert layer["mediaType"].endswith("+zstd" if compression == "zstd" else "+gzip")
            toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
            buf = io.BytesIO()
            reg.fetch_blob("test/base", layer["digest"], buf)
            blob = tmp_path / layer["digest"].split(":")[1]
            blob.write_bytes(buf.getvalue())
            subprocess.run(["estargz-oracle" if not oracle else oracle, "verify", "-toc", toc, str(blob)],
                           check=True, capture_output=True)
            raw = _decompress(buf.getvalue())
            assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
            assert layer["annotations"]["io.containers.estargz.uncompressed-size"] == str(len(raw))
    # Layers that already are eStargz are kept as they are.
    again = f"{registry.host}/test/base:{compression}-again"
    lazybuild("convert", dst, again)
    assert json.loads(lazybuild("inspect", "--format", "json", again).stdout)["manifest"]["layers"] == manifest["layers"]
    # Other tools accept the result, and it unpacks to the same root filesystem as the original.
    subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dst}"], check=True, capture_output=True)
    lazybuild("pull", dst, f"oci:{tmp_path}/layout:conv")
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{dst}", f"oci:{tmp_path}/skopeo:conv"],
                   check=True, capture_output=True)
    # umoci reads OCI manifests only: skopeo turns the original (Docker schema2) into one.
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{pushed}", f"oci:{tmp_path}/skopeo:orig"],
                   check=True, capture_output=True)
    original = _unpack(f"{tmp_path}/skopeo:orig", str(tmp_path / "u1"))
    if compression == "gzip":
        assert _unpack(f"{tmp_path}/layout:conv", str(tmp_path / "u2")) == original
    else:  # Debian's umoci (0.4.7) has no zstd: hand it the decompressed streams (same diff_ids)
        _decompress_layout(str(tmp_path / "layout"), "conv")
        assert _unpack(f"{tmp_path}/layout:plain", str(tmp_path / "u3")) == original
    assert original


def test_pull_push_keep_every_byte(registry, pushed, tmp_path):
    lazybuild("pull", pushed, f"oci:{tmp_path}/l:v1")
    index = json.loads((tmp_path / "l" / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    for f in (tmp_path / "l" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    out = json.loads(lazybuild("push", "--format", "json", f"oci:{tmp_path}/l:v1", f"{registry.host}/other/copy:v1").stdout)
    assert out["digest"] == entry["digest"]


def test_ranges_on_a_real_registry(registry, pushed):
    ref = Reference.parse(pushed)
    with Registry(registry.host) as reg:
        layer = reg.resolve(ref).manifest.layers[0]
        whole = io.BytesIO()
        reg.fetch_blob(ref.repository, layer.digest, whole)
        data = whole.getvalue()
        ranges = [(0, 10), (512, 2000), (len(data) - 7, len(data))]
        assert reg.read_ranges(ref.repository, layer.digest, ranges) == [data[a:b] for a, b in ranges]
        assert reg.blob_size(ref.repository, layer.digest) == len(data)
        assert reg.blob_size(ref.repository, "sha256:" + "0" * 64) is None


def test_platform_selection(registry, pushed, tmp_path):
    lazybuild("convert", pushed, f"oci:{tmp_path}/multi:x")  # an index of one platform, via our OCI writer
    with pytest.raises(ValueError, match="os/arch"):
        Platform.parse("linux")
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "")
    p = lazybuild("pull", "--format", "json", pushed, f"oci:{tmp_path}/p", "--platform", "linux/amd64")
    assert json.loads(p.stdout)["digest"].startswith("sha256:")


def test_tls_and_basic_auth(tmp_path_factory, archive):
    work = str(tmp_path_factory.mktemp("tls"))
    cert, key = make_tls(work)
    reg = RegistryProcess(work, tls=(cert, key), htpasswd=make_htpasswd(work, "alice", "s3cret"))
    try:
        certs = os.path.join(work, "certs.d", reg.host)
        os.makedirs(certs)
        shutil.copy(cert, os.path.join(certs, "ca.crt"))
        env = {"LAZYBUILD_CERTS_DIR": os.path.join(work, "certs.d"),
               "DOCKER_CONFIG": docker_config(work, reg.host, "alice", "s3cret")}
        ref = f"{reg.host}/secure/img:v1"
        lazybuild("push", f"docker-archive:{archive}", ref, env=env)
        info = json.loads(lazybuild("inspect", "--format", "json", ref, env=env).stdout)
        assert len(info["manifest"]["layers"]) == 2
        lazybuild("convert", ref, f"{reg.host}/secure/img:esgz", env=env)
        # wrong password: the status and what to do, never the password
        env_bad = {**env, "DOCKER_CONFIG": docker_config(work + "/bad", reg.host, "alice", "wrong")}
        p = lazybuild("inspect", ref, env=env_bad, ok=False)
        assert p.returncode == 3 and "401" in p.stderr and "docker login" in p.stderr and "wrong" not in p.stderr
        # no CA: a clear TLS error; --insecure skips verification
        p = lazybuild("inspect", ref, env={**env, "LAZYBUILD_CERTS_DIR": "/nonexistent"}, ok=False)
        assert p.returncode == 3 and reg.host in p.stderr and "--insecure" in p.stderr and "after" not in p.stderr
        lazybuild("inspect", ref, "--insecure", env={**env, "LAZYBUILD_CERTS_DIR": "/nonexistent"})
    finally:
        reg.stop()


def test_token_auth(tmp_path_factory, archive):
    work = str(tmp_path_factory.mktemp("token"))
    issuer = TokenIssuer(work, "bob", "hunter2")
    reg = RegistryProcess(work, token=issuer.registry_config())
    try:
        env = {"DOCKER_CONFIG": docker_config(work, reg.host, "bob", "hunter2")}
        ref = f"{reg.host}/team/img:v1"
        lazybuild("push", f"docker-archive:{archive}", ref, env=env)
        lazybuild("convert", ref, f"{reg.host}/team/img:esgz", env=env)
        assert json.loads(lazybuild("inspect", "--format", "json", f"{reg.host}/team/img:esgz", env=env).stdout)["manifest"]["layers"]
        assert issuer.issued >= 2
        # a token the registry no longer takes (expired, revoked) is fetched anew on the 401 it answers
        from lazybuild.registry.auth import load_credentials

        with Registry(reg.host, credentials=load_credentials(reg.host, os.path.join(env["DOCKER_CONFIG"], "config.json"))) as client:
            r = Reference.parse(ref)
            client.get_manifest(r)
            issued = issuer.issued
            for key in client.auth._tokens:
                client.auth._tokens[key] = "revoked"
            client.get_manifest(r)
        assert issuer.issued == issued + 1
        # anonymous: the token service grants nothing on team/, so the registry refuses
        p = lazybuild("inspect", ref, env={"DOCKER_CONFIG": work + "/nobody"}, ok=False)
        assert p.returncode == 3 and "401" in p.stderr
    finally:
        reg.stop()
        issuer.stop()


@pytest.fixture
def proxy(registry, pushed):
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def _layer(reg: Registry, ref: str):
    r = Reference.parse(ref)
    return r, reg.resolve(r).manifest.layers[0]


def test_faults_retried_or_worked_around(proxy, pushed):
    via_proxy = pushed.replace(pushed.split("/")[0], proxy.host)
    with Registry(proxy.host, backoff_s=0.01) as reg:
        ref, layer = _layer(reg, via_proxy)
        expected = io.BytesIO()
        reg.fetch_blob(ref.repository, layer.digest, expected)
        data = expected.getvalue()

        proxy.faults = {"status": [(500, 2), (429, 1)]}
        got = io.BytesIO()
        reg.fetch_blob(ref.repository, layer.digest, got)
        assert got.getvalue() == data

        proxy.faults = {"drop_body": 2}  # dropped mid-body twice: resumed with Range
        got = io.BytesIO()
        reg.fetch_blob(ref.repository, layer.digest, got)
        assert got.getvalue() == data

        proxy.faults = {"refuse_head": True}  # size from a 1-byte ranged GET instead
        assert reg.blob_size(ref.repository, layer.digest) == len(data)

        ranges = [(0, 100), (1000, 1100)]
        for fault in ("ignore_range", "reject_multirange", "redirect_blobs"):
            proxy.faults = {fault: True}
            assert reg.read_ranges(ref.repository, layer.digest, ranges) == [data[a:b] for a, b in ranges], fault


def test_credentials_not_forwarded_on_redirect(proxy, pushed):
    via_proxy = pushed.replace(pushed.split("/")[0], proxy.host)
    proxy.faults = {"require_basic": True, "redirect_blobs": True}
    with Registry(proxy.host, credentials=Credentials("carol", "pw"), backoff_s=0.01) as reg:
        ref, layer = _layer(reg, via_proxy)
        buf = io.BytesIO()
        reg.fetch_blob(ref.repository, layer.digest, buf)
    redirected = [h for port, method, path, h in proxy.requests if port == proxy.redirect_port]
    assert redirected and all("Authorization" not in h and "authorization" not in h for h in redirected)
    assert any("Authorization" in h for port, _, _, h in proxy.requests if port == proxy.port)


def test_bad_bytes_and_dead_registries_fail_clearly(proxy, pushed):
    via_proxy = pushed.replace(pushed.split("/")[0], proxy.host)
    with Registry(proxy.host, backoff_s=0.01) as reg:
        ref, layer = _layer(reg, via_proxy)
        proxy.faults = {"corrupt_blobs": True}
        buf = io.BytesIO()
        with pytest.raises(RegistryError, match="digest") as e:
            reg.fetch_blob(ref.repository, layer.digest, buf)
        assert buf.getvalue() == b"" and proxy.host in str(e.value)
        proxy.faults = {"status": [(503, 10)]}
        with pytest.raises(RegistryError, match="503") as e:
            reg.get_manifest(ref)
        assert "try again later" in str(e.value) and proxy.host in str(e.value)
    with Registry("127.0.0.1:1", backoff_s=0.01, timeout_s=2) as dead:
        with pytest.raises(RegistryError, match="127.0.0.1:1.*reachable"):
            dead.get_manifest(Reference.parse("127.0.0.1:1/x/y:z"))


def test_debian_image_round_trip(registry, oracle, tmp_path_factory):
    """A real root filesystem (debootstrap minbase + python3 + gcc): pushed, converted, pulled back; the
    converted image unpacks (umoci) to the same tree, and every layer passes the reference's check."""
    d = tmp_path_factory.mktemp("debian")
    rootfs = debootstrap_rootfs()
    archive = docker_archive([rootfs], str(d / "debian.tar"))
    base, conv = f"{registry.host}/debian/dev:base", f"{registry.host}/debian/dev:esgz"
    lazybuild("push", f"docker-archive:{archive}", base)
    lazybuild("convert", base, conv, "--prioritized-files", _python_startup_files(d))
    lazybuild("pull", conv, f"oci:{d}/layout:esgz")
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{base}", f"oci:{d}/orig:base"],
                   check=True, capture_output=True)
    subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{conv}"], check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{conv}", f"oci:{d}/skopeo:esgz"],
                   check=True, capture_output=True)
    from lazybuild.layout import OCILayout

    layout = OCILayout(str(d / "layout"))
    (manifest, _), = layout.manifests_for("esgz")
    for layer in manifest.layers:
        toc = layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
        subprocess.run([oracle, "verify", "-toc", toc, layout.blob_path(layer.digest)], check=True, capture_output=True)
        order = subprocess.run([oracle, "order", layout.blob_path(layer.digest)], check=True, capture_output=True,
                               text=True).stdout.splitlines()
        assert order.index(".prefetch.landmark") > 0 and "usr/bin/python3.11" in order[: order.index(".prefetch.landmark")]
    original = _unpack(f"{d}/orig:base", str(d / "u1"))
    assert len(original) > 5000
    assert _unpack(f"{d}/layout:esgz", str(d / "u2")) == original


def _python_startup_files(d) -> str:
    path = d / "prio.txt"
    path.write_text("usr/bin/python3.11\nusr/lib/python3.11/os.py\nusr/lib/python3.11/site.py\n")
    return str(path)


def test_multi_platform_images(registry, pushed, tmp_path):
    """An index of two platforms: pushed whole with --all-platforms, one picked by --platform, converted whole."""
    from lazybuild.image import OCI_CONFIG, OCI_INDEX, Descriptor, Index, Manifest
    from lazybuild.layout import OCILayout

    lazybuild("pull", pushed, f"oci:{tmp_path}/l:single")
    layout = OCILayout(str(tmp_path / "l"))
    (base, _), = layout.manifests_for("single")
    config = json.loads(layout.read_blob(base.config.digest))
    entries = []
    for arch in ("amd64", "arm64"):
        raw = json.dumps({**config, "architecture": arch}).encode()
        cfg = Descriptor(OCI_CONFIG, layout.put_bytes(raw), len(raw))
        m = Manifest.build(cfg, base.layers)
        layout.put_bytes(m.raw)
        entries.append(m.descriptor(Platform("linux", arch)))
    index = Index.build(entries)
    layout.put_bytes(index.raw)
    layout.add_to_index(Descriptor(OCI_INDEX, index.digest, len(index.raw)), "multi")

    ref = f"{registry.host}/multi/img:v1"
    lazybuild("push", f"oci:{tmp_path}/l:multi", ref, "--all-platforms")
    assert len(json.loads(lazybuild("inspect", "--format", "json", ref).stdout)["index"]["manifests"]) == 2
    assert json.loads(lazybuild("inspect", "--format", "json", ref, "--platform", "linux/arm64").stdout)["config"]["architecture"] == "arm64"
    lazybuild("convert", ref, f"{registry.host}/multi/img:esgz", "--all-platforms")
    info = json.loads(lazybuild("inspect", "--format", "json", f"{registry.host}/multi/img:esgz", "--platform", "linux/arm64").stdout)
    assert info["config"]["architecture"] == "arm64" and len(info["index"]["manifests"]) == 2
    assert all("containerd.io/snapshot/stargz/toc.digest" in x["annotations"] for x in info["manifest"]["layers"])
    p = lazybuild("pull", ref, f"oci:{tmp_path}/p", "--platform", "linux/s390x", ok=False)
    assert p.returncode == 1 and "linux/s390x" in p.stderr and "--platform" in p.stderr


def test_cross_repository_mount_and_credential_helper(registry, pushed, proxy, tmp_path):
    """eStargz layers kept by convert into another repository are mounted, not uploaded; credentials can
    come from a docker-credential-* helper."""
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-lazytest"
    helper.write_text('#!/bin/sh\nread server\necho "{\\"Username\\": \\"dave\\", \\"Secret\\": \\"pw-$server\\"}"\n')
    helper.chmod(0o755)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.json").write_text(json.dumps({"credHelpers": {proxy.host: "lazytest"}}))
    env = {"DOCKER_CONFIG": str(conf), "PATH": f"{helper_dir}:{os.environ['PATH']}"}
    via_proxy = pushed.replace(pushed.split("/")[0], proxy.host)
    proxy.faults = {"require_basic": True}
    lazybuild("convert", via_proxy, f"{proxy.host}/test/base:mount-src", env=env)
    lazybuild("convert", f"{proxy.host}/test/base:mount-src", f"{proxy.host}/elsewhere/img:v1", env=env)
    posts = [path for port, method, path, h in proxy.requests if method == "POST" and "/elsewhere/img/" in path]
    assert len(posts) == 3 and all("mount=sha256" in p and "from=test%2Fbase" in p for p in posts)  # 2 layers + config
    auths = {h.get("Authorization") for port, m, path, h in proxy.requests if h.get("Authorization")}
    import base64

    assert auths == {"Basic " + base64.b64encode(f"dave:pw-{proxy.host}".encode()).decode()}
    uploads = [path for port, method, path, h in proxy.requests if method in ("PUT", "PATCH") and "/elsewhere/img/blobs/" in path]
    assert uploads == []


def test_docker_archive_destination(registry, pushed, tmp_path):
    out = tmp_path / "img.tar"
    lazybuild("convert", pushed, f"docker-archive:{out}:lazy/img:esgz")
    info = json.loads(subprocess.run(["skopeo", "inspect", f"docker-archive:{out}"], check=True, capture_output=True,
                                     text=True).stdout)
    assert len(info["Layers"]) == 2
    assert json.loads(subprocess.run(["tar", "-xOf", str(out), "manifest.json"], check=True, capture_output=True,
                                     text=True).stdout)[0]["RepoTags"] == ["lazy/img:esgz"]
    lazybuild("push", f"docker-archive:{out}", f"{registry.host}/from/archive:v1")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".lazybuild")]
