"""Evil registries, layouts and archives against the registry client (issue 14), on real services: Debian's
docker-registry behind the fault proxy playing the evil registry, and `EvilServer` as the second host a
registry redirects to (or a whole TLS registry). Each case asserts a clear error (or a bounded, verified
result), that credentials went nowhere but the registry, and that the host canary tree is untouched. (The
manifest parser and capped bodies as properties: unit/test_hostile_registry_parsers.py.)"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile

import pytest

from lazybuild.digest import sha256_digest
from lazybuild.image import OCI_INDEX, OCI_MANIFEST, Index
from lazybuild.registry import Credentials, Reference, Registry, RegistryError
from lazybuild.testing.registry import docker_config, make_tls
from support.cli_runner import lazybuild
from support.registry import EvilServer, FaultProxy

MIB = 1 << 20


@pytest.fixture(scope="module")
def image(registry, archive) -> str:
    ref = f"{registry.host}/hostile/base:v1"
    lazybuild("push", f"docker-archive:{archive}", ref)
    return ref


@pytest.fixture
def proxy(registry, image):
    p = FaultProxy(registry.host)
    yield p
    p.stop()


@pytest.fixture
def servers():
    """EvilServers a test starts, stopped after it."""
    started: list[EvilServer] = []

    def start(answer, tls=None) -> EvilServer:
        s = EvilServer(answer, tls)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def via(proxy: FaultProxy, ref: str) -> str:
    return ref.replace(ref.split("/")[0], proxy.host)


def manifest_doc(registry_host: str, ref: str) -> dict:
    with Registry(registry_host) as reg:
        return json.loads(reg.resolve(Reference.parse(ref)).manifest.raw)


def blob_files(layout: str) -> list[str]:
    d = os.path.join(layout, "blobs", "sha256")
    return [n for n in os.listdir(d) if not n.startswith(".")] if os.path.isdir(d) else []


# --- credentials to the wrong host -----------------------------------------------------------------------


@pytest.mark.parametrize("challenge", ["bearer", "basic"])
def test_blob_redirect_to_a_host_asking_for_credentials(proxy, image, tmp_path, canary, servers, challenge):
    """The registry redirects a blob to host B, which answers 401 with a realm of its own: the pull fails
    naming B, B never sees an Authorization header, its realm is never asked, and the registry's own
    challenge (Basic) stays the one we answer."""
    def answer(method, path, headers):
        if path.startswith("/token"):
            return 200, {"Content-Type": "application/json"}, b'{"token": "stolen"}'
        www = f'Bearer realm="{evil.url}/token",service="evil"' if challenge == "bearer" else 'Basic realm="evil"'
        return 401, {"WWW-Authenticate": www}, b'{"errors": [{"code": "UNAUTHORIZED"}]}'

    evil = servers(answer)
    proxy.faults = {"require_basic": True, "redirect_blobs_to": evil.url}
    env = {"DOCKER_CONFIG": docker_config(str(tmp_path / "conf"), proxy.host, "erin", "pw-erin")}
    out = tmp_path / "out"
    p = lazybuild("pull", via(proxy, image), f"oci:{out}", env=env, ok=False)
    assert p.returncode == 3  # the registry's answer (lazybuild.errors.RemoteError)
    assert evil.host in p.stderr and proxy.host in p.stderr and "redirected" in p.stderr, p.stderr
    assert "nothing was sent" in p.stderr and "pw-erin" not in p.stderr
    assert evil.requests, "the redirect was not followed at all"
    assert evil.authorizations() == []
    assert not [path for _, path, _ in evil.requests if path.startswith("/token")]
    assert any(h.get("Authorization", "").startswith("Basic ") for port, _, _, h in proxy.requests if port == proxy.port)
    assert blob_files(str(out)) == []  # nothing was named
    assert sorted(os.listdir(tmp_path)) == ["conf", "out"]

    # The same through the API: the stored challenge is still the registry's, and it still works.
    with Registry(proxy.host, credentials=Credentials("erin", "pw-erin"), backoff_s=0.01) as reg:
        ref = Reference.parse(via(proxy, image))
        layer = reg.resolve(ref).manifest.layers[0]
        with pytest.raises(RegistryError, match=evil.host):
            reg.fetch_blob(ref.repository, layer.digest, io.BytesIO())
        assert reg.auth._challenge[0] == "basic"
        reg.get_manifest(ref)
    assert evil.authorizations() == []


def test_token_realm_elsewhere_is_fine_when_the_registry_names_it(proxy, image, tmp_path, servers):
    """Docker Hub's way: the registry's own challenge names a token service on another host. That realm
    gets the credentials (the registry chose it), and the pull works."""
    tokens = servers(lambda m, path, h: (200, {"Content-Type": "application/json"}, b'{"token": "t0k3n"}'))
    proxy.faults = {"challenge": f'Bearer realm="{tokens.url}/token",service="proxy"'}
    env = {"DOCKER_CONFIG": docker_config(str(tmp_path / "conf"), proxy.host, "frank", "pw-frank")}
    lazybuild("pull", via(proxy, image), f"oci:{tmp_path}/out", env=env)
    assert tokens.authorizations() and all(a.startswith("Basic ") for a in tokens.authorizations())
    assert any(h.get("Authorization") == "Bearer t0k3n" for _, _, _, h in proxy.requests)


def test_basic_credentials_never_go_to_a_plain_http_realm_of_a_tls_registry(tmp_path, servers):
    work = str(tmp_path)
    tls = make_tls(work)
    tokens = servers(lambda m, path, h: (200, {"Content-Type": "application/json"}, b'{"token": "t"}'))
    registry = servers(lambda m, path, h: (401, {"WWW-Authenticate": f'Bearer realm="{tokens.url}/token"'}, b""), tls=tls)
    certs = os.path.join(work, "certs.d", registry.host)
    os.makedirs(certs)
    shutil.copy(tls[0], os.path.join(certs, "ca.crt"))
    with Registry(registry.host, loopback=False, certs_dir=os.path.join(work, "certs.d"),
                  credentials=Credentials("gina", "pw-gina"), backoff_s=0.01) as reg:
        with pytest.raises(RegistryError, match="plain HTTP") as e:
            reg.get_manifest(Reference.parse(f"{registry.host}/a/b:c"))
    assert tokens.url in str(e.value) and "pw-gina" not in str(e.value)
    assert tokens.requests == []


# --- redirects -----------------------------------------------------------------------------------------


def test_redirects_limited_to_http_and_never_downgraded(tmp_path, servers):
    ref = "a/b:c"
    # A loop: refused after a few hops.
    loop = servers(lambda m, path, h: (302, {"Location": path}, b""))
    with Registry(loop.host, loopback=True, backoff_s=0.01) as reg:
        with pytest.raises(RegistryError, match="redirected more than 5 times"):
            reg.get_manifest(Reference.parse(f"{loop.host}/{ref}"))
    assert len(loop.requests) == 6
    # Somewhere that is not http(s).
    for location in ("file:///etc/shadow", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/"):
        odd = servers(lambda m, path, h, loc=location: (307, {"Location": loc}, b""))
        with Registry(odd.host, loopback=True, backoff_s=0.01) as reg:
            with pytest.raises(RegistryError, match="http\\(s\\) URLs only"):
                reg.get_manifest(Reference.parse(f"{odd.host}/{ref}"))
    # From a TLS registry down to plain HTTP, even on the same machine.
    plain = servers(lambda m, path, h: (200, {"Content-Type": OCI_MANIFEST}, b"{}"))
    tls = make_tls(str(tmp_path))
    secure = servers(lambda m, path, h: (302, {"Location": plain.url + path}, b""), tls=tls)
    certs = tmp_path / "certs.d" / secure.host
    certs.mkdir(parents=True)
    shutil.copy(tls[0], certs / "ca.crt")
    with Registry(secure.host, loopback=False, certs_dir=str(tmp_path / "certs.d"), backoff_s=0.01) as reg:
        with pytest.raises(RegistryError, match="HTTPS to plain HTTP"):
            reg.get_manifest(Reference.parse(f"{secure.host}/{ref}"))
    assert plain.requests == []


# --- digests from manifests, headers, layouts and archives ----------------------------------------------


def _evil_digests(canary, dest: str) -> list[str]:
    rel = canary.rel_from(os.path.join(dest, "blobs", "sha256"))
    return ["sha256:" + rel + "/root/victim", "sha256:../../../../etc/shadow", "sha256:" + "A" * 64,
            "sha256:" + "g" * 64, "sha512:" + "0" * 128, "sha256:" + "0" * 63, " sha256:" + "0" * 64]


@pytest.mark.parametrize("where", ["layer", "config", "index", "header"])
def test_evil_digests_from_the_registry(proxy, registry, image, tmp_path, canary, where):
    doc = manifest_doc(registry.host, image)
    dest = str(tmp_path / "out")
    for evil in _evil_digests(canary, dest):
        m = json.loads(json.dumps(doc))
        extra: dict = {}
        if where == "layer":
            m["layers"][0]["digest"] = evil
        elif where == "config":
            m["config"]["digest"] = evil
        elif where == "header":
            extra = {"Docker-Content-Digest": evil}
        body, media_type = json.dumps(m).encode(), m["mediaType"]
        if where == "index":
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": media_type, "digest": evil, "size": 100,
                 "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
            media_type = OCI_INDEX
        proxy.faults = {"manifests": {"evil": (body, media_type, extra)}}
        before = len(proxy.requests)
        p = lazybuild("pull", via(proxy, image).replace(":v1", ":evil"), f"oci:{dest}", "--platform", "linux/amd64", ok=False)
        # (HTTP strips the blanks around a header value: " sha256:0...0" arrives well formed, and wrong.)
        expected = "hash to" if where == "header" and evil != evil.strip() else "not a sha256 digest"
        # a digest in a document is bad data (exit 1); in a header, a registry outside the protocol (3)
        assert p.returncode == (3 if where == "header" else 1) and expected in p.stderr, (evil, p.stderr)
        assert "Traceback" not in p.stderr
        # Nothing was asked for by that digest, and nothing landed anywhere.
        assert not [path for _, _, path, _ in proxy.requests[before:] if "/blobs/" in path], evil
        assert blob_files(dest) == []
    with Registry(proxy.host, backoff_s=0.01) as reg:
        for evil in _evil_digests(canary, dest):
            with pytest.raises(ValueError, match="not a sha256 digest"):
                reg.fetch_blob("hostile/base", evil, io.BytesIO())
        with pytest.raises(ValueError, match="not a sha256 digest"):
            Reference.parse(f"{proxy.host}/hostile/base@sha256:../../../etc/shadow")


def test_evil_oci_layouts_are_refused(image, registry, tmp_path, canary):
    good = tmp_path / "good"
    lazybuild("pull", image, f"oci:{good}:v1")
    target = f"{registry.host}/hostile/copy:v1"

    def variant(name: str) -> str:
        d = tmp_path / name
        shutil.copytree(good, d, symlinks=True)
        return str(d)

    def refused(layout: str, *needles: str) -> None:
        p = lazybuild("push", f"oci:{layout}:v1", target, ok=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        for n in needles:
            assert n in p.stderr, (n, p.stderr)
        assert "CANARY-SECRET" not in p.stderr

    index = json.loads((good / "index.json").read_text())
    for evil in _evil_digests(canary, str(good)):
        d = variant("evil-index")
        bad = json.loads(json.dumps(index))
        bad["manifests"][0]["digest"] = evil
        (tmp_path / "evil-index" / "index.json").write_text(json.dumps(bad))
        refused(d, "index.json", "not a sha256 digest")
        shutil.rmtree(d)

    # A nested index whose entry is evil.
    from lazybuild.layout import OCILayout

    d = variant("nested")
    layout = OCILayout(d)
    evil_index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:../../../../etc/shadow", "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    digest = layout.put_bytes(evil_index)
    entry = {"mediaType": OCI_INDEX, "digest": digest, "size": len(evil_index),
             "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (tmp_path / "nested" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    refused(d, "not a sha256 digest")

    # An index nested in itself, deeper than any image.
    d = variant("deep")
    layout = OCILayout(d)
    inner = layout.resolve("v1")
    for _ in range(6):
        raw = Index.build([type(inner)(inner.media_type, inner.digest, inner.size, {}, inner.platform)]).raw
        from lazybuild.image import Descriptor, Platform

        inner = Descriptor(OCI_INDEX, layout.put_bytes(raw), len(raw), platform=Platform("linux", "amd64"))
    (tmp_path / "deep" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**inner.to_json(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    refused(d, "nested more than 4")

    # Files of the layout that are symlinks to host files: never followed.
    manifest_digest = index["manifests"][0]["digest"]
    d = variant("blob-link")
    blob = os.path.join(d, "blobs", "sha256", manifest_digest.split(":")[1])
    os.unlink(blob)
    os.symlink(canary.secret, blob)
    refused(d, "symlink")
    d = variant("index-link")
    os.unlink(os.path.join(d, "index.json"))
    os.symlink(canary.secret, os.path.join(d, "index.json"))
    refused(d, "symlink")

    # blobs/sha256 pointing at a host directory: neither read nor written through.
    d = variant("dir-link")
    shutil.rmtree(os.path.join(d, "blobs", "sha256"))
    os.symlink(canary.writable_dir, os.path.join(d, "blobs", "sha256"))
    refused(d, "blobs/sha256", "symlink")
    p = lazybuild("pull", image, f"oci:{d}:v2", ok=False)
    assert p.returncode == 1 and "symlink" in p.stderr, p.stderr

    # An index.json past the cap.
    d = variant("huge-index")
    (tmp_path / "huge-index" / "index.json").write_bytes(b'{"manifests": [' + b" " * (5 * MIB) + b"]}")
    refused(d, "4 MiB cap")


def test_evil_docker_archives_are_refused(tmp_path, registry, canary, archive):
    secret_rel = os.path.relpath(canary.secret, str(tmp_path))

    def evil_archive(name: str, entry: dict, members: dict[str, bytes] | None = None, links: dict[str, str] | None = None) -> str:
        path = str(tmp_path / f"{name}.tar")
        with tarfile.open(path, "w") as tf:
            for member, data in {**(members or {}), "manifest.json": json.dumps([entry]).encode()}.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            for member, target in (links or {}).items():
                info = tarfile.TarInfo(member)
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tf.addfile(info)
        return path

    config = b'{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}'
    cases = [
        ("host-config", {"Config": canary.secret, "Layers": []}, {}, {}, "not in the archive"),
        ("rel-config", {"Config": secret_rel, "Layers": []}, {}, {}, "not in the archive"),
        ("rel-layer", {"Config": "c.json", "Layers": ["../" * 8 + canary.secret.lstrip("/")]}, {"c.json": config}, {},
         "not in the archive"),
        ("link-layer", {"Config": "c.json", "Layers": ["l.tar"]}, {"c.json": config}, {"l.tar": canary.secret},
         "not a regular file"),
        ("not-a-list", {"Config": 1, "Layers": "x"}, {}, {}, "manifest.json"),
        ("huge-config", {"Config": "c.json", "Layers": []}, {"c.json": b" " * (9 * MIB)}, {}, "8 MiB cap for configs"),
    ]
    for name, entry, members, links, needle in cases:
        path = evil_archive(name, entry, members, links)
        p = lazybuild("push", f"docker-archive:{path}", f"{registry.host}/hostile/archive:{name}", ok=False)
        assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr, (name, p.stderr)
        assert "CANARY-SECRET" not in p.stderr


# --- bounded work ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_blob(registry) -> tuple[str, bytes]:
    """A 32 MiB incompressible blob in the registry (what a large layer is to the range readers)."""
    data = os.urandom(32 * MIB)
    digest = sha256_digest(data)
    with Registry(registry.host) as reg:
        reg.push_blob("hostile/big", digest, len(data), lambda: io.BytesIO(data))
    return digest, data


def test_whole_blob_answers_to_ranges_are_bounded(proxy, big_blob):
    """A registry that answers every Range request with 200 and the whole blob. The mounter reads one
    request per missed chunk (read_ranges), the snapshotter the tail first (read_tail), the prefetch a
    span (stream_range): each of those would have cost the whole blob. Bytes are counted at the proxy."""
    digest, data = big_blob
    size = len(data)
    # Loopback socket buffers take a few MiB more than a client reads before it hangs up.
    slack = 12 * MIB
    chunks = [(i * 2 * MIB + 4096, i * 2 * MIB + 4096 + 256 * 1024) for i in range(16)]
    proxy.faults = {"ignore_range": True}

    with Registry(proxy.host, backoff_s=0.01) as reg:  # chunk reads first (the mounter)
        first = reg.read_ranges("hostile/big", digest, [(0, 100)])
        after_first = proxy.blob_bytes_sent
        assert first == [data[:100]] and reg.ranges_ignored
        assert after_first <= 100 + slack
        for a, b in chunks:
            assert reg.read_ranges("hostile/big", digest, [(a, b), (b + 10, b + 20)]) == [data[a:b], data[b + 10:b + 20]]
        assert b"".join(reg.stream_range("hostile/big", digest, 1000, 5 * MIB)) == data[1000:5 * MIB]
        assert reg.read_tail("hostile/big", digest, 51) == (size, data[-51:])
    print(f"\nchunks first: {proxy.blob_bytes_sent} bytes sent for {len(chunks) + 3} reads of a {size}-byte blob")
    assert proxy.blob_bytes_sent <= size + after_first + MIB  # one whole download after the first answer

    proxy.blob_bytes_sent = 0
    with Registry(proxy.host, backoff_s=0.01) as reg:  # the tail first (the snapshotter)
        assert reg.read_tail("hostile/big", digest, 4096) == (size, data[-4096:])
        for a, b in chunks:
            assert reg.read_ranges("hostile/big", digest, [(a, b)]) == [data[a:b]]
    print(f"tail first: {proxy.blob_bytes_sent} bytes sent")
    assert proxy.blob_bytes_sent <= size + MIB

    # The kept copy is verified: a registry that corrupts whole downloads is caught, not served.
    proxy.faults = {"ignore_range": True, "corrupt_blobs": True}
    with Registry(proxy.host, backoff_s=0.01) as reg:
        assert reg.read_ranges("hostile/big", digest, [(0, 10)]) == [data[:10]]  # sliced from the 200
        with pytest.raises(RegistryError, match="digest"):
            reg.read_ranges("hostile/big", digest, [(100, 110)])


def _manifest_with(doc: dict, **changes) -> bytes:
    m = json.loads(json.dumps(doc))
    for path, value in changes.items():
        node = m
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    return json.dumps(m).encode()


def test_oversized_answers_name_their_cap(proxy, registry, image, tmp_path, servers):
    doc = manifest_doc(registry.host, image)
    mt = doc["mediaType"]
    evil_ref = via(proxy, image).replace(":v1", ":big")

    def fails(*needles: str, args=("inspect", evil_ref), env=None, code=3) -> str:  # 3: the registry's answer
        p = lazybuild(*args, env=env, ok=False)
        assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
        for n in needles:
            assert n in p.stderr, (n, p.stderr)
        return p.stderr

    proxy.faults = {"manifests": {"big": (b"{" + b" " * (5 * MIB) + b"}", mt, {})}}
    fails("4 MiB cap for manifests")
    bomb = gzip.compress(b" " * (64 * MIB), 9)  # ~64 KiB on the wire
    proxy.faults = {"manifests": {"big": (bomb, mt, {"Content-Encoding": "gzip"})}}
    fails("4 MiB cap for manifests")
    proxy.faults = {"error_body": (404, b'{"errors": [' + b" " * MIB + b"]}")}
    fails("404", "64 KiB cap for error bodies")
    # A config descriptor past the config cap: refused before anything is fetched.
    proxy.faults = {"manifests": {"big": (_manifest_with(doc, config__size=100 * MIB), mt, {})}}
    before = len(proxy.requests)
    fails("8 MiB cap for configs", args=("pull", evil_ref, f"oci:{tmp_path}/out"), code=1)  # the image's data
    assert not [p for _, _, p, _ in proxy.requests[before:] if "/blobs/" in p]
    # A layer that is longer than its descriptor says: cut off there, nothing kept.
    proxy.faults = {"manifests": {"big": (_manifest_with(doc, layers__0__size=10), mt, {})}}
    fails("more than the 10 bytes its descriptor gives", args=("pull", evil_ref, f"oci:{tmp_path}/out"))
    assert blob_files(str(tmp_path / "out")) == []
    # A token answer past its cap, from the realm the registry's own challenge names.
    tokens = servers(lambda m, path, h: (200, {"Content-Type": "application/json"},
                                         b'{"token": "' + b"x" * (2 * MIB) + b'"}'))
    proxy.faults = {"challenge": f'Bearer realm="{tokens.url}/token",service="proxy"'}
    fails("1 MiB cap for token answers", tokens.host, args=("inspect", via(proxy, image)))
