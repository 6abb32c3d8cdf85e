"""`lazybuild build -o/--output`, `--push`, `--load` as buildx spells them: the parser, where each output goes,
and every bad value refused through the console script (exit 2, one `lazybuild: error:` line, no build)."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest

from lazybuild.exporter.output import (DockerLoadDest, NamedOCIArchiveDest, NamedOCIDest, OutputError, OutputSpec,
                                       StdoutDest, image_destinations, parse_outputs)
from lazybuild.transfer import ArchiveDest, RegistryDest

from test_cli import LAZYBUILD


@pytest.mark.parametrize("text, want", [
    ("./out", OutputSpec("local", "./out")),
    ("-", OutputSpec("tar", "-")),
    ("type=local,dest=d", OutputSpec("local", "d")),
    ("type=tar,dest=-", OutputSpec("tar", "-")),
    ("type=oci,dest=i.tar", OutputSpec("oci", "i.tar")),
    ("type=oci,dest=d,tar=false", OutputSpec("oci", "d", tar=False)),
    ("type=docker,dest=-,name=a/b:1", OutputSpec("docker", "-", ("a/b:1",))),
    ("type=docker", OutputSpec("docker")),
    ("type=image,name=r/a,push=true,compression=zstd:chunked", OutputSpec("image", "", ("r/a",), True, True, "zstd")),
    ('type=registry,"name=r/a,r/b",oci-mediatypes=true', OutputSpec("registry", "", ("r/a", "r/b"), True)),
    ("type=image,compression=estargz,push=1", OutputSpec("image", push=True)),
    ("type=stargz,push=true", OutputSpec("stargz", push=True, tar=False)),
    ("type=stargz,dest=x.tar", OutputSpec("stargz", "x.tar")),
    ("type=stargz,dest=d,compression=zstd", OutputSpec("stargz", "d", tar=False, compression="zstd")),
])
def test_specs_as_buildx_reads_them(text, want):
    assert OutputSpec.parse(text) == want


BAD = [
    ("type=local,dst=x", "unknown key dst (known for type=local: type, dest)"),
    ("type=image,name=a,push=ture", "push=ture: want true or false"),
    ("type=oci,dest=x,tar=maybe", "tar=maybe: want true or false"),
    ("type=oci", "type=oci needs dest=FILE or dest=-"),
    ("type=tar", "type=tar needs dest=FILE or dest=-"),
    ("type=local,dest=-", "type=local writes a directory"),
    ("type=oci,dest=-,tar=false", "tar=false writes a directory, not stdout"),
    ("type=docker,dest=x,tar=false", "type=docker writes a docker-archive, a tar"),
    ("type=oci,dest=x,push=true", "push= does not go with type=oci (known for type=oci: type, dest, name, tar, "
                                  "compression, oci-mediatypes)"),
    ("type=tar,dest=x,name=a", "name= does not go with type=tar"),
    ("type=registry,name=a,push=false", "type=registry pushes"),
    ("type=image,oci-mediatypes=false", "lazybuild writes OCI media types only"),
    ("type=image,compression=uncompressed", "compression=uncompressed: want one of gzip, estargz, zstd, zstd:chunked"),
    ("type=cacheonly", "type=cacheonly: unknown type (known: local, tar, oci, docker, image, registry, stargz)"),
    ("dest=x", "type= is missing"),
    ("type=oci,dest=x,dest=y", "dest given twice"),
    ("type=oci,x", "'x' is not KEY=VALUE"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_specs_name_the_known_keys_and_values(text, message):
    with pytest.raises(OutputError, match=None) as e:
        OutputSpec.parse(text)
    assert message in str(e.value)


def test_push_and_load_are_outputs_and_one_output_per_build():
    assert parse_outputs([], True, False) == OutputSpec("registry", push=True)
    assert parse_outputs([], False, True) == OutputSpec("docker")
    assert parse_outputs([], False, True).loads
    assert parse_outputs([], False, False) is None
    with pytest.raises(OutputError, match="-o ./a and --push: one output per build"):
        parse_outputs(["./a"], True, False)


def _close(dests):
    for dest, _ in dests:
        dest.close()


def test_where_images_go(tmp_path):
    spec = OutputSpec.parse(f"type=oci,dest={tmp_path / 'image.tar'}")
    dests = image_destinations(spec, ["127.0.0.1:5000/app"])
    try:
        [(dest, done)] = dests
        # buildx: the tag in ref.name, the full name in io.containerd.image.name
        assert isinstance(dest, NamedOCIArchiveDest) and dest.tag == "latest"
        assert dest.full_name == "127.0.0.1:5000/app:latest" and done.startswith("wrote an OCI tarball")
    finally:
        _close(dests)
    dests = image_destinations(OutputSpec.parse(f"type=oci,dest={tmp_path / 'd'},tar=false,name=a/b:v2"), ["x"])
    try:
        [(dest, _)] = dests
        assert type(dest) is NamedOCIDest and dest.tag == "v2" and dest.full_name == "docker.io/a/b:v2"
    finally:
        _close(dests)
    dests = image_destinations(OutputSpec.parse(f"type=docker,dest={tmp_path / 'd.tar'}"), ["app:1"])
    try:
        [(dest, _)] = dests
        assert isinstance(dest, ArchiveDest) and dest.tag == "docker.io/library/app:1"
    finally:
        _close(dests)
    dests = image_destinations(OutputSpec.parse("type=oci,dest=-"), [])
    try:
        assert isinstance(dests[0][0], StdoutDest)
    finally:
        _close(dests)
    dests = image_destinations(OutputSpec("registry", push=True), ["127.0.0.1:5000/a", "127.0.0.1:5000/b:2"])
    try:
        assert [type(d) for d, _ in dests] == [RegistryDest, RegistryDest]
        assert [done for _, done in dests] == ["pushed 127.0.0.1:5000/a:latest", "pushed 127.0.0.1:5000/b:2"]
    finally:
        _close(dests)
    # no file before an image is sent (a layout directory is made when opened); staging dirs gone on close
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_load_without_docker_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Exception) as e:
        DockerLoadDest("app:latest")
    assert "needs the docker CLI on PATH" in str(e.value) and e.value.exit_code == 5


def build(*args, stdin=None):
    return subprocess.run([LAZYBUILD, "build", *args], capture_output=True, text=True, stdin=stdin,
                          env={**os.environ, "CI": "1"})


@pytest.mark.parametrize("text, message", BAD)
def test_the_console_script_refuses_bad_outputs_before_building(tmp_path, text, message):
    state = tmp_path / "state"
    p = build("--state-dir", str(state), "-o", text, str(tmp_path / "no-context"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("lazybuild: error: ") and message in p.stderr.splitlines()[0]
    assert "lazybuild: hint: " in p.stderr and not state.exists()


@pytest.mark.parametrize("args, message", [
    (["--push"], "pushing (--push, push=true, type=registry) needs -t REGISTRY/NAME:TAG or name="),
    (["-o", "type=registry"], "needs -t REGISTRY/NAME:TAG"),
    (["--iidfile", "id"], "--iidfile needs an image output"),
    (["-o", "type=tar,dest=x", "--iidfile", "id"], "--iidfile needs an image output"),
    (["--label", "nokey"], "--label 'nokey': want KEY=VALUE"),
    (["--network", "bridge"], "invalid choice: 'bridge'"),
    (["--push", "--load", "-t", "a"], "--push and --load: one output per build"),
])
def test_the_console_script_refuses_bad_flags(tmp_path, args, message):
    p = build("--state-dir", str(tmp_path / "state"), *args, str(tmp_path))
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "state").exists()


def test_help_lists_the_outputs_and_flags():
    p = build("--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for word in ("--push", "--load", "--iidfile", "--label", "--pull", "--network", "type=registry",
                 "zstd:chunked", "- reads it from stdin"):
        assert word in text, word


def test_load_names_every_tag():
    dests = image_destinations(OutputSpec("docker"), ["app:1", "127.0.0.1:5000/app:2"])
    try:
        [(dest, done)] = dests
        assert isinstance(dest, DockerLoadDest) and dest.inner.tag == "docker.io/library/app:1"
        assert dest.also == ["127.0.0.1:5000/app:2"]
        assert done == "loaded into Docker as docker.io/library/app:1, 127.0.0.1:5000/app:2"
    finally:
        _close(dests)


def test_no_tar_on_a_terminal(tmp_path):
    """`-o -` with stdout on a terminal is refused (as buildx), before anything is built."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout is the pseudo-terminal
        os.execv(LAZYBUILD, [LAZYBUILD, "build", "--state-dir", str(tmp_path / "s"), "-o", "-", str(tmp_path)])
    out = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert b"refusing to write a tar to a terminal" in out and not (tmp_path / "s").exists()
