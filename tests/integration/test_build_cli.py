"""`lazybuild build` as a buildx user drives it: every output type, --push, --load into a real dockerd, --iidfile,
--label, --network, -f -, against the test registry and the Debian test base (mounted lazily).

One state dir for the module: the first build runs the steps, the others answer from the step cache and only
export, so each test checks one output for real without building again."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time

import pytest

from lazybuild.registry import Reference, Registry
from test_build import lazy_base  # noqa: F401  (the fixture: the Debian test base in the registry as eStargz)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("build-cli-state")


@pytest.fixture(scope="module")
def ctx(lazy_base, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("build-cli-ctx")
    (d / "f.txt").write_text("from the context\n")
    (d / "Dockerfile").write_text(f"FROM {lazy_base}\nLABEL from.dockerfile=yes\n"
                                  "RUN echo hello > /hello && ls /sys/class/net > /nets\nCOPY f.txt /f.txt\n")
    return d


def build(state, ctx, *args, env=None, stdin=None, ok=True, text=True):
    p = subprocess.run(["lazybuild", "build", "--progress", "plain", "--state-dir", str(state), *args, str(ctx)],
                       capture_output=True, text=text, input=stdin, env={**os.environ, **(env or {})}, timeout=900)
    if ok:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def oci_index_and_config(layout_files: dict[str, bytes]) -> tuple[dict, dict]:
    index = json.loads(layout_files["index.json"])
    [entry] = index["manifests"]
    manifest = json.loads(layout_files["blobs/sha256/" + entry["digest"].split(":")[1]])
    config = json.loads(layout_files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    return entry, config


def tar_files(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name.lstrip("./"): tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def test_output_path_is_the_root_filesystem(state, ctx, tmp_path):
    out = tmp_path / "outdir"
    p = build(state, ctx, "-o", str(out))
    assert (out / "hello").read_text() == "hello\n" and (out / "f.txt").read_text() == "from the context\n"
    assert (out / "etc/debian_version").exists()
    assert p.stdout == ""  # no image, no digest


def test_output_dash_is_a_tar_on_stdout(state, ctx):
    p = build(state, ctx, "-o", "-", text=False)
    names = subprocess.run(["tar", "t"], input=p.stdout, capture_output=True, check=True).stdout.decode().split()
    assert "./hello" in names and "./f.txt" in names and "./etc/debian_version" in names


def test_type_oci_is_a_tarball_named_as_buildx_names_it(state, ctx, tmp_path, registry):
    out = tmp_path / "image.tar"
    iid = tmp_path / "iid"
    meta = tmp_path / "meta.json"
    p = build(state, ctx, "-t", "127.0.0.1:5000/app", "-o", f"type=oci,dest={out}", "--label", "from.cli=1",
              "--iidfile", str(iid), "--metadata-file", str(meta))
    assert tarfile.is_tarfile(out)
    entry, config = oci_index_and_config(tar_files(str(out)))
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "latest",
                                    "io.containerd.image.name": "127.0.0.1:5000/app:latest"}
    assert config["config"]["Labels"]["from.cli"] == "1" and config["config"]["Labels"]["from.dockerfile"] == "yes"
    metadata = json.loads(meta.read_text())
    assert iid.read_text() == metadata["containerimage.config.digest"]  # not pushed: the image ID
    assert metadata["containerimage.digest"] == entry["digest"] == p.stdout.strip()
    assert metadata["image.name"] == "127.0.0.1:5000/app"
    assert sorted(os.listdir(tmp_path)) == ["iid", "image.tar", "meta.json"]  # no staging left


def test_type_oci_tar_false_is_a_layout_and_dest_dash_is_stdout(state, ctx, tmp_path):
    layout = tmp_path / "layout"
    build(state, ctx, "-o", f"type=oci,dest={layout},tar=false", "--source-date-epoch", "1")
    files = {os.path.relpath(os.path.join(d, n), layout): open(os.path.join(d, n), "rb").read()
             for d, _, names in os.walk(layout) for n in names}
    entry, config = oci_index_and_config(files)
    assert "oci-layout" in files and entry["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    p = build(state, ctx, "-o", "type=oci,dest=-", "--source-date-epoch", "1", text=False)
    (tmp_path / "from-stdout.tar").write_bytes(p.stdout)
    entry2, _ = oci_index_and_config(tar_files(str(tmp_path / "from-stdout.tar")))
    assert entry2["digest"] == entry["digest"]  # the same image (same epoch): one export path


def test_type_docker_and_load_into_dockerd(state, ctx, tmp_path, dockerd):
    out = tmp_path / "docker.tar"
    build(state, ctx, "-t", "lazy/app:v1", "-o", f"type=docker,dest={out}")
    saved = tar_files(str(out))
    [entry] = json.loads(saved["manifest.json"])
    assert entry["RepoTags"] == ["docker.io/lazy/app:v1"]
    iid = tmp_path / "iid"
    p = build(state, ctx, "-t", "lazy/app:loaded", "-t", "lazy/app:also", "--load", "--iidfile", str(iid),
              env=dockerd.env())
    assert "drops the manifest's eStargz annotations" in p.stderr
    inspected = dockerd.image_config("lazy/app:loaded")
    assert inspected["Id"] == iid.read_text()  # --iidfile holds Docker's image ID
    assert dockerd.image_config("lazy/app:also")["Id"] == inspected["Id"]  # every -t names it
    assert inspected["Config"]["Labels"]["from.dockerfile"] == "yes"
    run = dockerd.docker("run", "--rm", "--network", "none", "lazy/app:loaded", "cat", "/hello", "/f.txt")
    assert run.stdout.decode() == "hello\nfrom the context\n"


def test_load_to_an_unreachable_daemon_says_so(state, ctx, tmp_path):
    p = build(state, ctx, "--load", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"}, ok=False)
    assert p.returncode == 5 and "lazybuild: error: docker load failed" in p.stderr
    assert "is the Docker daemon running" in p.stderr


def test_push_and_registry_outputs(state, ctx, tmp_path, registry):
    iid = tmp_path / "iid"
    ref = f"{registry.host}/cli/pushed:1"
    p = build(state, ctx, "-t", ref, "--push", "--iidfile", str(iid))
    digest = p.stdout.strip()
    assert iid.read_text() == digest  # pushed: the manifest digest
    with Registry(registry.host) as r:
        raw, _ = r.get_manifest(Reference.parse(ref))
        manifest = json.loads(raw)
        assert any("containerd.io/snapshot/stargz/toc.digest" in (lay.get("annotations") or {})
                   for lay in manifest["layers"])
    other = f"{registry.host}/cli/named:2"
    p = build(state, ctx, "-o", f"type=registry,name={other},compression=zstd:chunked")
    with Registry(registry.host) as r:
        raw, _ = r.get_manifest(Reference.parse(other))
    layers = json.loads(raw)["layers"]
    assert layers[-1]["mediaType"].endswith("+zstd")


def test_dockerfile_from_stdin_and_network_none(state, ctx, tmp_path, lazy_base):  # noqa: F811
    out = tmp_path / "rootfs"
    text = f"FROM {lazy_base}\nRUN ls /sys/class/net > /nets\n"
    build(state, ctx, "-f", "-", "-o", str(out), stdin=text)
    host_nets = (out / "nets").read_text().split()
    assert len(host_nets) > 1  # the host's interfaces
    out2 = tmp_path / "rootfs-none"
    build(state, ctx, "-f", "-", "--network", "none", "-o", str(out2), stdin=text)
    assert (out2 / "nets").read_text().split() == ["lo"]  # its own namespace: not the cached host result


@pytest.fixture
def served(tmp_path):
    """A loopback http.server over a directory."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_context(state, tmp_path, served, lazy_base):  # noqa: F811
    root, base = served
    with tarfile.open(root / "ctx.tar.gz", "w:gz") as tf:
        for name, data in (("Dockerfile", f"FROM {lazy_base}\nCOPY app.txt /app.txt\nRUN cat /app.txt\n"),
                           ("app.txt", "from a URL\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            tf.addfile(info, io.BytesIO(data.encode()))
    out = tmp_path / "out"
    p = build(state, f"{base}/ctx.tar.gz", "-o", str(out))
    assert (out / "app.txt").read_text() == "from a URL\n" and "| from a URL" in p.stderr


@pytest.fixture
def git_daemon(tmp_path):
    """A git daemon on loopback serving every repository under its base path (git://127.0.0.1:PORT/NAME)."""
    base = tmp_path / "git"
    base.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={base}",
                             "--listen=127.0.0.1", f"--port={port}", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield base, f"git://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_git_context_with_ref_and_subdir(state, tmp_path, git_daemon, lazy_base):  # noqa: F811
    base, url = git_daemon
    repo = base / "app.git"
    repo.mkdir()
    def git(*a):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                       check=True, capture_output=True)

    git("init", "-q")
    (repo / "svc").mkdir()
    (repo / "svc" / "Dockerfile").write_text(f"FROM {lazy_base}\nCOPY . /src\n")
    (repo / "svc" / "v").write_text("one\n")
    git("add", ".")
    git("commit", "-qm", "one")
    git("tag", "v1")
    (repo / "svc" / "v").write_text("two\n")
    git("commit", "-qam", "two")
    out = tmp_path / "out"
    build(state, f"{url}/app.git#v1:svc", "-o", str(out))
    assert (out / "src/v").read_text() == "one\n" and not (out / "src/.git").exists()
    out2 = tmp_path / "out2"
    build(state, f"{url}/app.git#:svc", "-o", str(out2))  # no ref: the default branch
    assert (out2 / "src/v").read_text() == "two\n"
    p = build(state, f"{url}/app.git#v1:../..", "-o", str(tmp_path / "out3"), ok=False)
    # `..` stops at the clone's top (resolved inside it): the repository's root, which has no Dockerfile
    assert p.returncode == 1 and "Dockerfile: no such file" in p.stderr, p.stderr


@pytest.mark.parametrize("kind", ["local", "registry"])
def test_cache_to_and_from_on_a_fresh_state_dir(ctx, tmp_path, registry, kind):
    spec_to, spec_from = ((f"type=local,dest={tmp_path / 'cache'}", f"type=local,src={tmp_path / 'cache'}")
                          if kind == "local" else
                          (f"type=registry,ref={registry.host}/cli/cache:build",) * 2)
    first = tmp_path / "state-a"
    p = build(first, ctx, "--cache-to", spec_to, "-o", str(tmp_path / "a"))
    assert "cache: 2 steps exported" in p.stderr
    fresh = tmp_path / "state-b"
    p = build(fresh, ctx, "--cache-from", spec_from, "-o", str(tmp_path / "b"))
    assert "cache: 2 steps imported" in p.stderr
    step_lines = [line for line in p.stderr.splitlines() if "] RUN " in line or "] COPY " in line]
    assert step_lines and all(line.endswith("(cached)") for line in step_lines), step_lines  # no step ran
    assert (tmp_path / "b/hello").read_text() == "hello\n" and (tmp_path / "b/f.txt").exists()
    assert (tmp_path / "b/nets").read_text() == (tmp_path / "a/nets").read_text()  # the imported result


AGENT_QUERY = ("import os, socket, struct; s = socket.socket(socket.AF_UNIX); s.connect(os.environ['SSH_AUTH_SOCK']); "
               "s.sendall(struct.pack('>IB', 1, 11)); n, t = struct.unpack('>IB', s.recv(5)); "
               "open('/tmp/keys', 'w').write(str(struct.unpack('>I', s.recv(4))[0]) if t == 12 else 'bad')")


def test_ssh_agent_forwarded_into_a_run_step(state, tmp_path, lazy_base):  # noqa: F811
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.05)
        for name in ("a", "b"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
            subprocess.run(["ssh-add", "-q", str(tmp_path / name)], env={**os.environ, "SSH_AUTH_SOCK": sock},
                           check=True, capture_output=True)
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        # a user that is not root reaches the agent: the step's socket is the mount's uid's, mode 0600
        (ctx / "Dockerfile").write_text(f'FROM {lazy_base}\nUSER 1000\n'
                                        f'RUN --mount=type=ssh,uid=1000 python3 -c "{AGENT_QUERY}"\n')
        out = tmp_path / "out"
        build(state, ctx, "--ssh", "default", "-o", str(out), env={"SSH_AUTH_SOCK": sock})
        assert (out / "tmp/keys").read_text() == "2"  # the host agent's keys, reached through the relay
        assert not os.path.exists(out / "run/buildkit/ssh_agent.0")  # the mount stub is gone
        (ctx / "Dockerfile").write_text(f'FROM {lazy_base}\nUSER 1000\n'
                                        f'RUN --mount=type=ssh python3 -c "{AGENT_QUERY}"\n')  # root's socket
        p = build(state, ctx, "--ssh", "default", "-o", str(tmp_path / "out1"), env={"SSH_AUTH_SOCK": sock}, ok=False)
        assert p.returncode == 4 and "PermissionError" in p.stderr
        (ctx / "Dockerfile").write_text(f"FROM {lazy_base}\nRUN --mount=type=ssh,id=deploy,required true\n")
        p = build(state, ctx, "-o", str(tmp_path / "out2"), ok=False)
        assert p.returncode == 4 and "ssh agent 'deploy' is required but was not given" in p.stderr
    finally:
        agent.terminate()
        agent.wait(timeout=10)
