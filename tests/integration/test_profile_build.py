"""Build profiles end to end (lazybuild/profiles.py, the mounter's FilePrefetch, `lazybuild build --profile`,
`lazybuild profile`): a real docker-registry (no referrers API: the tag fallback is what runs), real FUSE
mounts and runc. Requests are counted at a proxy in front of the registry (support.registry.FaultProxy),
never timed.

A build records a profile of its base; a second build with an empty chunk cache finds it and fetches the
files it lists in far fewer requests than files; pushed, it is found by a build with an empty state dir and
cache; hostile profiles in the registry are refused with a clear error and the build runs without them."""

from __future__ import annotations

import http.client
import io
import json
import re
import subprocess

import pytest

from lazybuild.digest import sha256_digest
from lazybuild.errors import DataError, RemoteError
from lazybuild.image import OCI_INDEX, OCI_MANIFEST
from lazybuild.profiles import (EMPTY_JSON, MEDIA_TYPE, TAG_SUFFIX, Profile, ProfileError, ProfileStore, Subject,
                                artifact_manifest, find_profile, profile_tag)
from lazybuild.registry import Reference, Registry
from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.cli_runner import lazybuild
from support.registry import EvilServer, FaultProxy

# ~160 files of the base spread over it (one per package directory), read by the RUN step
READ = "cat /usr/share/doc/*/copyright /usr/lib/python3.11/*/__init__.py | wc -c > /size"


@pytest.fixture(scope="module")
def base(registry, tmp_path_factory) -> dict:
    """Debian minbase + python3 as eStargz in the registry (one layer), and its manifest digest."""
    d = tmp_path_factory.mktemp("profile-base")
    archive = docker_archive([debootstrap_rootfs(("python3", "python3-venv"))], str(d / "base.tar"))
    ref = f"{registry.host}/profile/base:1"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    info = json.loads(lazybuild("inspect", "--format", "json", ref).stdout)
    with Registry(registry.host) as reg:
        resolved = reg.resolve(Reference.parse(ref))
    return {"ref": ref, "repo": "profile/base", "digest": resolved.manifest.digest, "manifest": resolved.manifest,
            "layers": [x["digest"] for x in info["manifest"]["layers"]]}


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def context(tmp_path, proxy, repo="profile/base") -> str:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(f"FROM {proxy.host}/{repo}:1\nRUN {READ}\n")
    return str(ctx)


def build(ctx, state, cache, *args, ok=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["lazybuild", "build", "--progress", "plain", "--no-cache", "--state-dir", str(state),
                        "--cache", str(cache), *args, ctx], capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def blob_gets(proxy, since: int, layers: list[str]) -> int:
    """Ranged GETs of the base's layer blobs (footer and TOC reads included) since request SINCE."""
    return sum(1 for _, method, path, _ in proxy.requests[since:]
               if method == "GET" and any(path.endswith(f"/blobs/{d}") for d in layers))


def test_a_build_records_a_profile_and_the_next_one_prefetches_it(base, proxy, tmp_path):
    ctx, state = context(tmp_path, proxy), tmp_path / "state"
    n0 = len(proxy.requests)
    first = build(ctx, state, tmp_path / "cache1")
    without = blob_gets(proxy, n0, base["layers"])
    store = ProfileStore(str(state))
    profile = store.load(base["digest"])
    assert profile is not None, first.stderr[-3000:]
    files = profile.layers[base["layers"][0]]
    docs = [f for f in files if f.startswith("usr/share/doc/") and f.endswith("/copyright")]
    inits = [f for f in files if f.startswith("usr/lib/python3.11/") and f.endswith("/__init__.py")]
    assert len(docs) > 20 and len(inits) > 20 and files.index(docs[0]) < files.index(inits[0])  # first-read order
    assert "saved in" in first.stderr
    # Without a profile, the reads cost a request per 512 KiB window they touched (the read engine's).
    assert without >= 20, without

    n1 = len(proxy.requests)
    second = build(ctx, state, tmp_path / "cache2")  # an empty chunk cache: everything comes from the registry
    with_profile = blob_gets(proxy, n1, base["layers"])
    assert f"{profile.file_count} files, prefetched" in second.stderr, second.stderr[-3000:]
    # The profiled files came in a few merged multi-range requests (plus the footer and TOC reads).
    assert with_profile * 4 < without, (with_profile, without)
    assert with_profile * 10 < profile.file_count, (with_profile, profile.file_count)
    assert store.load(base["digest"]).file_count == profile.file_count  # nothing new was read
    said = re.search(r"profile prefetch of \S+: (\d+) files, (\d+) chunks in (\d+) requests", second.stderr)
    assert said and 100 < int(said[1]) <= profile.file_count, second.stderr[-2000:]  # regular files (no symlinks)
    assert 1 <= int(said[3]) < with_profile and "still running" not in second.stderr

    # ls / show / rm
    ls = json.loads(lazybuild("profile", "ls", "--format", "json", "--state-dir", str(state)).stdout)[0]
    assert ls["base"] == base["digest"] and ls["files"] == profile.file_count and ls["size"] > 0
    shown = json.loads(lazybuild("profile", "show", "--format", "json", base["digest"], "--state-dir", str(state)).stdout)
    assert Profile.parse(json.dumps(shown).encode()) == profile
    shown = json.loads(lazybuild("profile", "show", "--format", "json", base["ref"], "--state-dir", str(state)).stdout)
    assert shown["base"] == base["digest"]
    lazybuild("profile", "rm", base["digest"], "--state-dir", str(state))
    assert lazybuild("profile", "ls", "--state-dir", str(state)).stdout == ""
    gone = lazybuild("profile", "rm", base["digest"], "--state-dir", str(state), ok=False)
    assert gone.returncode == 1 and "no local profile" in gone.stderr
    bad = lazybuild("profile", "rm", "sha256:../../etc/shadow", "--state-dir", str(state), ok=False)
    assert bad.returncode == 1 and "not a sha256 digest" in bad.stderr

    # --profile off: no profile is used or saved; --record-base still records the reads.
    record = tmp_path / "record.ndjson"
    off = build(ctx, state, tmp_path / "cache3", "--profile", "off", "--record-base", str(record))
    assert "profile of" not in off.stderr and store.load(base["digest"]) is None
    assert any(json.loads(line)["path"].endswith("/copyright") for line in record.read_text().splitlines())
    # with profiles on, --record-base gets the reads too (copied from the build's own record)
    record.unlink()
    build(ctx, state, tmp_path / "cache4", "--record-base", str(record))
    assert any(json.loads(line)["path"].endswith("/copyright") for line in record.read_text().splitlines())
    assert store.load(base["digest"]) is not None


def test_a_failed_build_still_saves_what_it_read(base, proxy, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {proxy.host}/profile/base:1\nRUN cat /etc/os-release && false\n")
    record = tmp_path / "record.ndjson"
    p = build(str(ctx), tmp_path / "state", tmp_path / "cache", "--record-base", str(record), ok=False)
    assert p.returncode == 4, p.stderr[-2000:]
    saved = ProfileStore(str(tmp_path / "state")).load(base["digest"])
    assert saved is not None and "etc/os-release" in saved.layers[base["layers"][0]]
    assert any(json.loads(line)["path"] == "etc/os-release" for line in record.read_text().splitlines())


def test_a_pushed_profile_is_found_by_a_build_on_another_machine(base, registry, proxy, tmp_path):
    ctx = context(tmp_path, proxy)
    here = tmp_path / "here"
    build(ctx, here, tmp_path / "cache-here", "--profile", "push")
    profile = ProfileStore(str(here)).load(base["digest"])
    assert profile is not None and profile.file_count > 50
    with Registry(registry.host) as reg:  # the artifact is beside the base, under the fallback tag
        raw, _ = reg.get_manifest(Reference.parse(f"{base['ref'].rsplit(':', 1)[0]}:{profile_tag(base['digest'])}"))
    m = json.loads(raw)
    assert m["artifactType"] == MEDIA_TYPE and m["subject"]["digest"] == base["digest"]

    # `profile push` pushes the local one (the same bytes: the same artifact)
    pushed = json.loads(lazybuild("profile", "push", "--format", "json", base["ref"], "--state-dir", str(here)).stdout)
    assert pushed["digest"] == sha256_digest(raw) and pushed["files"] == profile.file_count

    there = tmp_path / "there"  # another machine: an empty state dir and chunk cache
    n0 = len(proxy.requests)
    found = build(ctx, there, tmp_path / "cache-there")
    paths = [p for _, method, p, _ in proxy.requests[n0:] if method == "GET"]
    assert any(f"/referrers/{base['digest']}" in p for p in paths)  # asked first; this registry answers 404
    assert any(p.endswith(f"/manifests/{profile_tag(base['digest'])}") for p in paths)
    assert f"({proxy.host}/profile/base): {profile.file_count} files" in found.stderr, found.stderr[-3000:]
    assert blob_gets(proxy, n0, base["layers"]) * 10 < profile.file_count
    assert ProfileStore(str(there)).load(base["digest"]) == profile  # kept locally

    shown = lazybuild("profile", "show", "--format", "json", f"{proxy.host}/profile/base:1", "--state-dir", str(tmp_path / "none"))
    assert Profile.parse(shown.stdout.encode()) == profile and "profile from" in shown.stderr


def push_artifact(reg: Registry, repo: str, base: dict, blob: bytes, tweak=None, proxy=None) -> None:
    """Push BLOB as a profile artifact of the base under the fallback tag. TWEAK(manifest) makes a manifest
    the registry itself would refuse (a digest that is none, a size that lies): PROXY serves it instead."""
    for data in (EMPTY_JSON, blob):
        reg.push_blob(repo, sha256_digest(data), len(data), lambda data=data: io.BytesIO(data))
    m = json.loads(artifact_manifest(Profile(base["digest"]), Subject(
        base["manifest"].media_type, base["digest"], len(base["manifest"].raw))))
    m["layers"][0].update(digest=sha256_digest(blob), size=len(blob))
    reg.put_manifest(repo, profile_tag(base["digest"]), json.dumps(m).encode(), OCI_MANIFEST)
    if proxy is not None:
        proxy.faults.pop("manifests", None)
    if tweak:
        tweak(m)
        proxy.faults["manifests"] = {profile_tag(base["digest"]): (json.dumps(m).encode(), OCI_MANIFEST, {})}


def hostile_profile(image: dict, **over) -> bytes:
    d = {"schemaVersion": 1, "mediaType": MEDIA_TYPE, "base": image["digest"],
         "layers": [{"digest": image["layers"][0], "files": ["usr/bin/python3"]}]}
    d.update(over)
    return json.dumps(d).encode()


def copy_base(registry, base: dict, repo: str) -> str:
    """The base image again in REPO (blobs mounted, the same manifest digest)."""
    with Registry(registry.host) as reg:
        m = base["manifest"]
        for desc in [m.config] + m.layers:
            reg.push_blob(repo, desc.digest, desc.size, lambda: io.BytesIO(b""), mount_from=base["repo"])
        reg.put_manifest(repo, "1", m.raw, m.media_type)
    return repo


@pytest.fixture(scope="module")
def hostile_repo(base, registry) -> str:
    """The base image in a repository of its own, where the tests push hostile profiles."""
    return copy_base(registry, base, "profile/hostile")


def hostile_cases(base: dict) -> list[tuple[str, bytes, object, str]]:
    """(name, profile blob, tweak of the artifact manifest, what the error says)."""
    big = b"{" + b" " * (2 << 20) + b"}"
    return [
        ("dotdot", hostile_profile(base, layers=[{"digest": base["layers"][0], "files": ["../../etc/shadow"]}]),
         None, "not a normalized name"),
        ("bad digest", hostile_profile(base, layers=[{"digest": "sha256:../../x", "files": ["a"]}]), None,
         "not a sha256 digest"),
        ("wrong types", hostile_profile(base, layers=[{"digest": base["layers"][0], "files": "usr/bin"}]), None,
         "files is not a list"),
        ("wrong version", hostile_profile(base, schemaVersion="1"), None, "schemaVersion"),
        ("another base", hostile_profile(base, base="sha256:" + "f" * 64), None, "is of base"),
        ("not json", b"\x00garbage", None, "not JSON"),
        ("oversized", big, None, "is not 1 to"),
        ("size lies", big, lambda m: m["layers"][0].update(size=100), "100"),
        ("bad blob digest", hostile_profile(base), lambda m: m["layers"][0].update(digest="sha256:../../etc"),
         "not a sha256 digest"),
        ("subject", hostile_profile(base), lambda m: m["subject"].update(digest="sha256:" + "e" * 64),
         "subject is not the base"),
        ("artifact type", hostile_profile(base), lambda m: m.update(artifactType="application/vnd.example.sbom"),
         "artifactType"),
        ("two layers", hostile_profile(base), lambda m: m.update(layers=m["layers"] * 2), "not exactly one layer"),
    ]


def test_hostile_profiles_in_the_registry_are_refused(base, registry, proxy, hostile_repo):
    with Registry(registry.host) as reg, Registry(proxy.host) as evil:
        for name, blob, tweak, says in hostile_cases(base):
            push_artifact(reg, hostile_repo, base, blob, tweak, proxy)
            with pytest.raises((DataError, RemoteError)) as e:
                find_profile(evil, hostile_repo, base["digest"])
            assert says in str(e.value), (name, str(e.value))


def test_a_build_runs_without_a_hostile_profile(base, registry, proxy, hostile_repo, tmp_path, canary):
    with Registry(registry.host) as reg:
        push_artifact(reg, hostile_repo, base, hostile_profile(base, layers=[
            {"digest": base["layers"][0], "files": [f"../../../../..{canary.root}/x", "usr/bin/python3"]}]))
    ctx, state = context(tmp_path, proxy, hostile_repo), tmp_path / "state"
    p = build(ctx, state, tmp_path / "cache")
    assert "warning: the build profile of" in p.stderr and "is not used" in p.stderr
    assert "not a normalized name" in p.stderr
    saved = ProfileStore(str(state)).load(base["digest"])  # what this build really read, not the hostile one
    assert saved is not None and all(".." not in f.split("/") for files in saved.layers.values() for f in files)
    assert any(f.endswith("/copyright") for f in saved.layers[base["layers"][0]])
    with pytest.raises(ProfileError):
        with Registry(registry.host) as reg:
            find_profile(reg, hostile_repo, base["digest"])


def referrers_registry(upstream: str, referrers):
    """The real registry behind a server that also has the referrers API: REFERRERS(path) answers
    `GET /v2/NAME/referrers/DIGEST`; everything else is forwarded as it is."""
    def answer(method, path, headers):
        if re.match(r"/v2/.+/referrers/sha256:", path):
            return referrers(path)
        conn = http.client.HTTPConnection(upstream, timeout=30)
        conn.request(method, path, headers={k: v for k, v in headers.items()
                                            if k.lower() not in ("host", "connection")})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        drop = ("transfer-encoding", "connection") + (("content-length",) if method != "HEAD" else ())
        return r.status, {k: v for k, v in r.getheaders() if k.lower() not in drop}, body
    return EvilServer(answer)


def test_the_referrers_api_is_asked_first(base, registry, tmp_path):
    """A registry with the referrers API: the profile is found through it (pushed by digest only, so the
    tag fallback could not find it), by find_profile and by a build on an empty machine."""
    repo = copy_base(registry, base, "profile/withrefs")
    profile = Profile(base["digest"], {base["layers"][0]: ["usr/share/doc/bash/copyright", "etc/os-release"]})
    subject = Subject(base["manifest"].media_type, base["digest"], len(base["manifest"].raw))
    raw = artifact_manifest(profile, subject)
    with Registry(registry.host) as reg:
        for data in (EMPTY_JSON, profile.to_bytes()):
            reg.push_blob(repo, sha256_digest(data), len(data), lambda data=data: io.BytesIO(data))
        reg.put_manifest(repo, sha256_digest(raw), raw, OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "9" * 64, "size": 10, "artifactType": "application/x-other"},
        {"mediaType": OCI_MANIFEST, "digest": sha256_digest(raw), "size": len(raw), "artifactType": MEDIA_TYPE}]}
    answer = {"now": (200, {"Content-Type": OCI_INDEX}, json.dumps(index).encode())}
    server = referrers_registry(registry.host, lambda path: answer["now"])
    try:
        with Registry(server.host) as reg:
            found, where = find_profile(reg, repo, base["digest"])
            assert found == profile and where.endswith("@" + sha256_digest(raw))
            assert not any(p.endswith(TAG_SUFFIX) for _, p, _ in server.requests)  # no tag lookup was needed

            for body, says in ((b"<html>", "not JSON"), (b"[]", "not an index"),
                               (json.dumps({"manifests": [{"artifactType": MEDIA_TYPE, "digest": "sha256:../x"}]})
                                .encode(), "not a sha256 digest"),
                               (b" " * (2 << 20), "cap")):
                answer["now"] = (200, {"Content-Type": OCI_INDEX}, body)
                with pytest.raises((DataError, RemoteError), match=says):
                    find_profile(reg, repo, base["digest"])

        answer["now"] = (200, {"Content-Type": OCI_INDEX}, json.dumps(index).encode())
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM {server.host}/{repo}:1\nRUN cat /etc/os-release > /dev/null\n")
        p = build(str(ctx), tmp_path / "state", tmp_path / "cache")
        assert f"({server.host}/{repo}): 2 files, prefetched" in p.stderr, p.stderr[-3000:]
        assert any(f"/referrers/{base['digest']}" in path for _, path, _ in server.requests)
    finally:
        server.stop()
