"""One reference syntax for every image command (issue 16): each bad image argument gets its message and exit
code from the installed console script; `copy`/`pull`/`push` check their direction; local transports (OCI
layout dirs and tars, docker-archives) round-trip without a registry; nerdctl's convert names and their
deprecated aliases. The parser itself is checked with hypothesis: only our errors, and round-trips."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lazybuild.errors import LazybuildError
from lazybuild.testing.images import docker_archive
from lazybuild.transfer import Location
from support import tarcases
from test_cli import run

REF = "127.0.0.1:5/never/used:v1"  # every refusal below comes before any connection (port 5: nothing listens)


def _error_and_hint(p) -> tuple[str, str]:
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr and lines[0].startswith("lazybuild: error: "), p.stderr
    hints = [line for line in lines if line.startswith("lazybuild: hint: ")]
    return lines[0], (hints[0] if hints else "")


# (argv, exit code, words in the error line, words in the hint)
BAD = [
    (["pull", "./relative", "oci:o"], 1, ["'./relative' looks like a path"], ["oci:./relative"]),
    (["pull", REF, "/tmp/some/dir"], 1, ["looks like a path"], ["oci:/tmp/some/dir"]),
    (["pull", REF, "../up"], 1, ["looks like a path"], ["oci:../up"]),
    (["copy", "image.tar", "oci:o"], 1, ["looks like a path"], ["oci-archive:image.tar", "docker-archive:image.tar"]),
    (["pull", "oci:/tmp/x", REF], 2, ["pull copies from a registry", f"lazybuild push oci:/tmp/x {REF}"], []),
    (["pull", REF, "127.0.0.1:5/other:v1"], 2, ["is a registry", "lazybuild copy"], []),
    (["pull", "oci:/tmp/a", "oci:/tmp/b"], 2, ["lazybuild copy oci:/tmp/a oci:/tmp/b"], []),
    (["push", REF, "oci:/tmp/x"], 2, ["push copies a local image", f"lazybuild pull {REF} oci:/tmp/x"], []),
    (["push", "oci:/tmp/a", "oci:/tmp/b"], 2, ["push copies to a registry", "lazybuild copy"], []),
    (["push", REF, "127.0.0.1:5/other:v1"], 2, ["lazybuild copy"], []),
    (["copy", "foo:bar/x", "oci:o"], 1, ["foo: is not a transport lazybuild knows"], ["oci:DIR"]),
    (["copy", "http://example.com/x", "oci:o"], 1, ["http:// is not a transport"], ["docker://"]),
    (["copy", "docker:busybox", "oci:o"], 1, ["docker://HOST/REPO"], []),
    (["copy", "dir:", "oci:o"], 1, ["dir: needs a directory"], []),
    (["inspect", "dir:/nonexistent/d"], 1, ["/nonexistent/d: no such directory"], []),
    (["copy", "ostree:/x", "oci:o"], 1, ["ostree: is not supported"], []),
    (["copy", "containers-storage:x", "oci:o"], 1, ["podman save --format oci-archive"], []),
    (["copy", "oci:", "oci:o"], 1, ["oci: needs a path"], []),
    (["copy", "oci:x:bad tag", "oci:o"], 1, ["is not a tag"], []),
    (["copy", "oci:x:t@sha256:" + "a" * 64, "oci:o"], 1, ["a tag or a digest, not both"], []),
    (["copy", "oci:x@sha256:abc", "oci:o"], 1, ["not a sha256 digest"], []),
    (["copy", REF, "oci:o@sha256:" + "a" * 64], 1, ["named by a tag, not a digest"], []),
    (["copy", "127.0.0.1:5/Upper", "oci:o"], 1, ["must be lowercase"], []),
    (["inspect", "oci-archive:/nonexistent/a.tar"], 1, ["/nonexistent/a.tar: no such file"], []),
    (["inspect", "oci:/nonexistent/layout"], 1, ["not an OCI image layout"], []),
    (["inspect", "/tmp/a.tar"], 1, ["looks like a path"], ["oci-archive:/tmp/a.tar"]),
    (["convert", REF, "oci:o", "--zstd-compression-level", "5"], 2, ["is for --zstd layers"], []),
    (["convert", REF, "oci:o", "--zstd", "--estargz-chunk-size", "1MiB"], 2, ["no chunks"], []),
    (["convert", REF, "oci:o", "--zstd", "--zstdchunked"], 2, ["not allowed with argument"], []),
    (["optimize", REF, "oci:o", "--env", "NOEQUALS"], 2, ["write it KEY=VALUE"], []),
    (["optimize", REF, "oci:o", "--period", "0"], 2, ["positive number of seconds"], []),
    (["optimize", "./here", "oci:o"], 1, ["looks like a path"], ["oci:./here"]),
    (["mount", "image.tar", "/tmp/never-mounted"], 1, ["looks like a path"], ["oci-archive:image.tar"]),
]


@pytest.mark.parametrize("argv,code,error_words,hint_words", BAD, ids=[" ".join(b[0])[:60] for b in BAD])
def test_bad_image_arguments_get_their_message(argv, code, error_words, hint_words, tmp_path):
    p = run(*argv, ok=False)
    error, hint = _error_and_hint(p)
    assert p.returncode == code, p.stderr
    for w in error_words:
        assert w in error, p.stderr
    for w in hint_words:
        assert w in hint, p.stderr
    assert "codec" not in p.stderr and "IDNA" not in p.stderr and "retry" not in p.stderr.lower()
    assert not os.path.exists("o")


def test_a_bad_reference_that_is_also_a_path_here_says_so(tmp_path, monkeypatch):
    (tmp_path / "MyImage").mkdir()
    monkeypatch.chdir(tmp_path)
    p = run("pull", REF, "MyImage", ok=False)
    error, hint = _error_and_hint(p)
    assert "must be lowercase" in error and "also a path here" in error and "oci:MyImage" in hint


# --- the parser ---------------------------------------------------------------------------------------------

REGISTRY_CASES = {
    "127.0.0.1:5000/app": ("127.0.0.1:5000", "app", "latest"),
    "localhost:5000/x/y:1.0": ("localhost:5000", "x/y", "1.0"),
    "[::1]:5000/a": ("[::1]:5000", "a", "latest"),
    "docker://127.0.0.1:5000/app:v2": ("127.0.0.1:5000", "app", "v2"),
    "ubuntu:22.04": ("docker.io", "library/ubuntu", "22.04"),
    "foo:bar": ("docker.io", "library/foo", "bar"),
    "example.com/team/img": ("example.com", "team/img", "latest"),
}


@pytest.mark.parametrize("text", sorted(REGISTRY_CASES))
def test_registry_references_keep_their_host(text):
    loc = Location.parse(text)
    assert loc.is_registry and (loc.ref.host, loc.ref.repository, loc.ref.tag) == REGISTRY_CASES[text]


@pytest.mark.parametrize("text,kind,path,tag,digest", [
    ("oci:/x/layout", "oci", "/x/layout", "", ""),
    ("oci:rel:v1", "oci", "rel", "v1", ""),
    ("oci:/l@sha256:" + "b" * 64, "oci", "/l", "", "sha256:" + "b" * 64),
    ("oci-archive:/tmp/a.tar", "oci-archive", "/tmp/a.tar", "", ""),
    ("oci-archive:a.tar:v1", "oci-archive", "a.tar", "v1", ""),
    ("docker-archive:a.tar:app:v1", "docker-archive", "a.tar", "app:v1", ""),
    ("dir:/x/d", "dir", "/x/d", "", ""),
    ("dir:with:colons", "dir", "with:colons", "", ""),
])
def test_local_transports(text, kind, path, tag, digest):
    loc = Location.parse(text)
    assert (loc.kind, loc.path, loc.tag, loc.digest) == (kind, path, tag, digest)
    assert Location.parse(str(loc)) == loc


_PIECES = st.sampled_from(["oci:", "oci-archive:", "docker-archive:", "docker://", "dir:", "foo:", "./", "/", "../",
                           "localhost:5000/", "127.0.0.1:5000/", "[::1]:5000/", "a", "B", ":", "@", "sha256:",
                           "a" * 64, ".tar", "/x", ":v1", "..", "\x00", "\n", "é", "xn--", "Ω", " ", "~"])


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_PIECES, max_size=8).map("".join)))
def test_parser_raises_only_our_errors_and_round_trips(text):
    try:
        loc = Location.parse(text)
    except LazybuildError as e:
        assert str(e) and e.exit_code == 1
        return
    again = Location.parse(str(loc))
    assert again == loc
    if loc.is_registry:
        assert str(loc.ref) == str(loc)


# --- local transports end to end (no registry) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    layer = tarcases.ustar_all_types(str(d / "layer.tar"))
    return docker_archive([layer], str(d / "img.tar"), tag="app:v1", cmd=["/bin/true"])


def _inspect(image: str) -> dict:
    return json.loads(run("inspect", "--format", "json", image).stdout)


def test_copy_between_local_transports(archive, tmp_path):
    base = _inspect(f"docker-archive:{archive}")
    assert base["config"]["config"]["Cmd"] == ["/bin/true"]
    out = json.loads(run("copy", "--format", "json", f"docker-archive:{archive}:app:v1", f"oci:{tmp_path}/layout:v1").stdout)
    assert out["destination"] == f"oci:{tmp_path}/layout:v1"
    assert _inspect(f"oci:{tmp_path}/layout:v1")["digest"] == out["digest"]
    assert _inspect(f"oci:{tmp_path}/layout@{out['digest']}")["digest"] == out["digest"]

    # oci-archive out and in: the same image, byte for byte
    tar_out = json.loads(run("copy", "--format", "json", f"oci:{tmp_path}/layout:v1", f"oci-archive:{tmp_path}/img-oci.tar:v1").stdout)
    assert tar_out["digest"] == out["digest"] and tarfile.is_tarfile(tmp_path / "img-oci.tar")
    assert _inspect(f"oci-archive:{tmp_path}/img-oci.tar")["digest"] == out["digest"]
    back = json.loads(run("copy", "--format", "json", f"oci-archive:{tmp_path}/img-oci.tar:v1", f"oci:{tmp_path}/again").stdout)
    assert back["digest"] == out["digest"]
    assert sorted(os.listdir(tmp_path / "again/blobs/sha256")) == sorted(os.listdir(tmp_path / "layout/blobs/sha256"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".lazybuild")]  # no temporary left behind

    p = run("inspect", f"oci-archive:{tmp_path}/img-oci.tar:nope", ok=False)
    assert p.returncode == 1 and "no image tagged 'nope'" in p.stderr


def test_skopeo_dir_in_and_out(archive, tmp_path, canary):
    out = json.loads(run("copy", "--format", "json", f"docker-archive:{archive}", f"dir:{tmp_path}/d").stdout)
    names = sorted(os.listdir(tmp_path / "d"))
    assert "manifest.json" in names and "version" in names and len(names) == 4  # + config and layer, by hex
    assert (tmp_path / "d/version").read_bytes() == b"Directory Transport Version: 1.1\n"
    assert _inspect(f"dir:{tmp_path}/d")["digest"] == out["digest"]
    assert json.loads(run("copy", "--format", "json", f"dir:{tmp_path}/d", f"oci:{tmp_path}/o").stdout)["digest"] == out["digest"]

    # a symlinked manifest.json is not followed; a blob that is not its digest is refused
    os.replace(tmp_path / "d/manifest.json", tmp_path / "manifest.json")
    os.symlink(canary.secret, tmp_path / "d/manifest.json")
    p = run("inspect", f"dir:{tmp_path}/d", ok=False)
    assert p.returncode == 1 and "a symlink is not followed" in p.stderr
    os.unlink(tmp_path / "d/manifest.json")
    os.replace(tmp_path / "manifest.json", tmp_path / "d/manifest.json")
    layer = json.loads((tmp_path / "d/manifest.json").read_text())["layers"][0]["digest"][7:]
    with open(tmp_path / "d" / layer, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    p = run("copy", f"dir:{tmp_path}/d", f"oci:{tmp_path}/o2", ok=False)
    assert p.returncode == 1 and "corrupt or changed" in p.stderr
    p = run("inspect", f"dir:{tmp_path}", ok=False)
    assert p.returncode == 1 and "no version file" in p.stderr and f"oci:{tmp_path}" in p.stderr


def _layers(layout: str) -> list[dict]:
    with open(os.path.join(layout, "index.json")) as f:
        desc = json.load(f)["manifests"][0]
    with open(os.path.join(layout, "blobs/sha256", desc["digest"][7:])) as f:
        return json.load(f)["layers"]


def test_convert_names(archive, tmp_path):
    # --estargz, explicit, is the default
    run("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/esgz", "--estargz", "--estargz-compression-level", "9",
        "--oci")
    (layer,) = _layers(tmp_path / "esgz")
    assert layer["mediaType"].endswith("tar+gzip") and "containerd.io/snapshot/stargz/toc.digest" in layer["annotations"]

    # --zstdchunked: eStargz with zstd (what --zstd meant before)
    p = run("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/zc", "--zstdchunked", "--estargz-chunk-size", "8KiB")
    (layer,) = _layers(tmp_path / "zc")
    assert layer["mediaType"].endswith("tar+zstd") and "containerd.io/snapshot/stargz/toc.digest" in layer["annotations"]
    assert "warning" not in p.stderr

    # --zstd: plain zstd, as nerdctl's, with a line saying the meaning changed
    p = run("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/z", "--zstd", "--zstd-compression-level", "19")
    assert "--zstd now means plain zstd" in p.stderr and "--zstdchunked" in p.stderr
    (layer,) = _layers(tmp_path / "z")
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd" and not layer.get("annotations")
    blob = (tmp_path / "z/blobs/sha256" / layer["digest"][7:]).read_bytes()
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(archive) as tf:
        assert raw == tf.extractfile("0/layer.tar").read()
    config = _inspect(f"oci:{tmp_path}/z")["config"]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]


def test_deprecated_convert_names_still_work(archive, tmp_path):
    record = tmp_path / "record.ndjson"
    record.write_text('{"path": "etc/hello.txt", "layer": 0}\n')
    p = run("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/old", "--chunk-size", "8KiB",
            "--prioritized-files", str(record))
    warnings = [line for line in p.stderr.splitlines() if "deprecated" in line]
    assert len(warnings) == 2 and "--estargz-chunk-size" in warnings[0] and "--estargz-record-in" in warnings[1]
    p = run("convert", f"docker-archive:{archive}", f"oci:{tmp_path}/new", "--estargz-chunk-size", "8KiB",
            "--estargz-record-in", str(record))
    assert "deprecated" not in p.stderr
    assert _layers(tmp_path / "old") == _layers(tmp_path / "new")


def test_layer_convert_names(tmp_path):
    layer = tarcases.ustar_all_types(str(tmp_path / "in.tar"))
    new = json.loads(run("layer", "convert", "--format", "json", layer, str(tmp_path / "a"), "--zstdchunked", "--estargz-chunk-size",
                         "8KiB").stdout)
    p = run("layer", "convert", "--format", "json", layer, str(tmp_path / "b"), "--zstd", "--chunk-size", "8KiB")
    old = json.loads(p.stdout)
    assert new == old and new["mediaType"].endswith("+zstd")
    assert [line for line in p.stderr.splitlines() if "deprecated" in line][0].count("--zstdchunked") == 1
    assert len([line for line in p.stderr.splitlines() if "deprecated" in line]) == 2


# --- hostile oci-archives ------------------------------------------------------------------------------------

def _oci_tar(path, members: list[tuple[str, bytes | None, str]]) -> str:
    """A tar of (name, data, kind) with kind "file", "symlink" (data is the target) or "sparse"-free others."""
    with tarfile.open(path, "w") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture()
def good_members(archive, tmp_path):
    run("copy", f"docker-archive:{archive}", f"oci:{tmp_path}/src")
    out = []
    for root, _, files in os.walk(tmp_path / "src"):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out.append((os.path.relpath(full, tmp_path / "src"), f.read(), "file"))
    return out


def test_hostile_oci_archives(good_members, tmp_path, canary):
    names = dict((n, d) for n, d, _ in good_members)
    # names climbing out, absolute names and unknown names are never written anywhere
    planted = os.path.join(canary.writable_dir, "evil")
    evil = _oci_tar(tmp_path / "climb.tar", good_members + [("../../../../../../.." + planted, b"owned", "file"),
                                                            (planted, b"owned", "file"),
                                                            ("blobs/sha256/../../../../../.." + planted, b"x", "file")])
    run("copy", f"oci-archive:{evil}", f"oci:{tmp_path}/out1")
    canary.check()

    # a symlinked index.json is refused, not followed
    members = [m for m in good_members if m[0] != "index.json"] + [("index.json", canary.secret.encode(), "symlink")]
    p = run("inspect", f"oci-archive:{_oci_tar(tmp_path / 'link.tar', members)}", ok=False)
    assert p.returncode == 1 and "'index.json' is not a regular file" in p.stderr
    # a name given twice
    p = run("inspect", f"oci-archive:{_oci_tar(tmp_path / 'twice.tar', good_members + [('index.json', b'{}', 'file')])}",
            ok=False)
    assert p.returncode == 1 and "appears twice" in p.stderr
    # a blob whose bytes are not its name's digest
    blob = next(n for n in names if n.startswith("blobs/") and len(names[n]) > 1000)
    members = [(n, d if n != blob else d[:-1] + bytes([d[-1] ^ 1]), k) for n, d, k in good_members]
    p = run("copy", f"oci-archive:{_oci_tar(tmp_path / 'bad.tar', members)}", f"oci:{tmp_path}/out2", ok=False)
    assert p.returncode == 1 and "corrupt or changed" in p.stderr and "Traceback" not in p.stderr
    # a compressed archive (it could expand without bound) is refused before anything is copied out
    good = _oci_tar(tmp_path / "good.tar", good_members)
    (tmp_path / "good.tar.gz").write_bytes(gzip.compress(open(good, "rb").read()))
    p = run("inspect", f"oci-archive:{tmp_path}/good.tar.gz", ok=False)
    assert p.returncode == 1 and "not a readable tar" in p.stderr
    # not a tar at all
    (tmp_path / "junk.tar").write_bytes(gzip.compress(b"junk" * 100))
    p = run("inspect", f"oci-archive:{tmp_path}/junk.tar", ok=False)
    assert p.returncode == 1 and "not a readable tar" in p.stderr
    canary.check()


def _two_platform_layout(root) -> dict[str, str]:
    """An OCI layout whose one tag is an index of a linux/amd64 and a linux/arm64 image; their manifest digests."""
    from lazybuild.image import OCI_INDEX, Descriptor, Index, Manifest, Platform
    from lazybuild.layout import OCILayout

    layout = OCILayout(str(root), create=True)
    digests = {}
    for arch in ("amd64", "arm64"):
        data = arch.encode() * 1000
        layer = Descriptor("application/vnd.oci.image.layer.v1.tar", layout.put_bytes(data), len(data))
        config = json.dumps({"architecture": arch, "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}).encode()
        cfg = Descriptor("application/vnd.oci.image.config.v1+json", layout.put_bytes(config), len(config))
        manifest = Manifest.build(cfg, [layer])
        layout.put_bytes(manifest.raw)
        digests[arch] = manifest.digest
    index = Index.build([Descriptor("application/vnd.oci.image.manifest.v1+json", d,
                                    len(layout.read_blob(d)), platform=Platform("linux", a)) for a, d in digests.items()])
    layout.put_bytes(index.raw)
    layout.add_to_index(Descriptor(OCI_INDEX, index.digest, len(index.raw)), "multi")
    return digests


def test_several_platforms_through_dir_and_oci_archive(tmp_path):
    digests = _two_platform_layout(tmp_path / "multi")
    for dest in (f"dir:{tmp_path}/d", f"oci-archive:{tmp_path}/m.tar:multi"):
        run("copy", "--all-platforms", f"oci:{tmp_path}/multi:multi", dest)
        for arch, digest in digests.items():
            assert _inspect_platform(dest, f"linux/{arch}") == digest, (dest, arch)
    # skopeo's layout for several images: the index in manifest.json, each image as <hex>.manifest.json
    names = set(os.listdir(tmp_path / "d"))
    assert {f"{d[7:]}.manifest.json" for d in digests.values()} <= names and "manifest.json" in names
    out = json.loads(run("copy", "--format", "json", f"dir:{tmp_path}/d", f"oci:{tmp_path}/one", "--platform", "linux/arm64").stdout)
    assert out["digest"] == digests["arm64"]


def _inspect_platform(image: str, platform: str) -> str:
    return json.loads(run("inspect", "--format", "json", image, "--platform", platform).stdout)["digest"]


@pytest.mark.parametrize("argv", [["rpull", "oci:/tmp/layout"], ["profile", "show", "oci-archive:/tmp/a.tar"],
                                  ["profile", "push", "docker-archive:/tmp/a.tar"]])
def test_registry_only_commands_parse_references_the_same_way(argv):
    """rpull and profile take any image argument's spelling (docker:// too) and refuse local images by kind."""
    p = run(*argv, ok=False)
    error, hint = _error_and_hint(p)
    assert p.returncode == 1 and "takes an image in a registry" in error and "is a local" in error, p.stderr
    assert "lazybuild copy" in hint
    p = run("rpull", "./relative", ok=False)
    assert p.returncode == 1 and "looks like a path" in p.stderr
