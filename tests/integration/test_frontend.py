"""The BuildKit gateway frontend against a real BuildKit (Docker 20.10, BuildKit v0.8).

Differential: each Dockerfile of tests/data/frontend_corpus is built once by BuildKit's built-in frontend
and once through `# syntax=<registry>/lazybuild:test`; the image configs and the final filesystems
must be equal. Where v0.8's built-in frontend lacks a feature (heredocs, COPY --link), the case
carries a Dockerfile.builtin that writes the same result without it (see each case.json note).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from support import CORPUS

CASES = sorted(os.listdir(CORPUS))
CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "Volumes",
                 "Healthcheck", "StopSignal", "Shell", "OnBuild")


def filesystem(dockerd, ref: str, tmp_path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, link target, content sha256) of the image's filesystem."""
    out = str(tmp_path / (ref.replace("/", "_").replace(":", "_") + ".tar"))
    dockerd.export_fs(ref, out)
    entries = {}
    with tarfile.open(out) as tf:
        for m in tf:
            digest = ""
            if m.isfile():
                digest = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
            entries[m.name.rstrip("/")] = (m.type, oct(m.mode), m.uid, m.gid, m.linkname, digest)
    os.unlink(out)
    return entries


def build_case(dockerd, frontend_image, case: str, tmp_path, tag_suffix: str = ""):
    src = os.path.join(CORPUS, case)
    ctx = tmp_path / "ctx"
    shutil.copytree(src, ctx, symlinks=True)
    meta = json.load(open(os.path.join(src, "case.json"))) if os.path.exists(os.path.join(src, "case.json")) else {}
    args = [a.replace("{case}", str(ctx)) for a in meta.get("args", [])]
    with open(ctx / "Dockerfile") as f:
        text = f.read()
    (ctx / "Dockerfile.lazybuild").write_text(f"# syntax={frontend_image}\n" + text)
    builtin = "Dockerfile.builtin" if (ctx / "Dockerfile.builtin").exists() else "Dockerfile"
    ours_tag, builtin_tag = f"corpus-{case}-lazybuild{tag_suffix}", f"corpus-{case}-builtin{tag_suffix}"
    dockerd.build(str(ctx), "-f", str(ctx / "Dockerfile.lazybuild"), "-t", ours_tag, *args)
    dockerd.build(str(ctx), "-f", str(ctx / builtin), "-t", builtin_tag, *args)
    return ours_tag, builtin_tag


@pytest.mark.parametrize("case", CASES)
def test_same_image_as_builtin_frontend(dockerd, frontend_image, case, tmp_path):
    ours, theirs = build_case(dockerd, frontend_image, case, tmp_path)
    a, b = dockerd.image_config(ours), dockerd.image_config(theirs)
    for key in CONFIG_FIELDS:
        assert a["Config"].get(key) == b["Config"].get(key), f"config {key} differs"
    assert (a["Os"], a["Architecture"]) == (b["Os"], b["Architecture"])
    fa, fb = filesystem(dockerd, ours, tmp_path), filesystem(dockerd, theirs, tmp_path)
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    changed = sorted(p for p in set(fa) & set(fb) if fa[p] != fb[p])
    assert not (only_a or only_b or changed), (
        f"filesystems differ: only ours {only_a[:20]}, only built-in {only_b[:20]}, "
        f"changed {[(p, fa[p], fb[p]) for p in changed[:20]]}")
    assert len(fa) > 1


def test_frontend_image_is_what_buildkit_runs(dockerd, frontend_image):
    """The image pulled for `# syntax=` carries the labels BuildKit checks and an absolute ENTRYPOINT."""
    dockerd.docker("pull", frontend_image)
    cfg = dockerd.image_config(frontend_image)["Config"]
    assert cfg["Labels"]["moby.buildkit.frontend.network.none"] == "true"
    assert "moby.buildkit.frontend.inputs" in cfg["Labels"]["moby.buildkit.frontend.caps"]
    assert cfg["Entrypoint"][0].startswith("/")


def _build_text(dockerd, frontend_image, tmp_path, text: str, files: dict[str, str] | None = None, *args: str):
    ctx = tmp_path / "bad"
    ctx.mkdir(exist_ok=True)
    for name, data in (files or {}).items():
        (ctx / name).write_text(data)
    (ctx / "Dockerfile").write_text(f"# syntax={frontend_image}\n" + text)
    return dockerd.build(str(ctx), *args, check=False)


@pytest.mark.parametrize("text,args,expected", [
    ("FROM lazybuild-test/python:bookworm\nRUN echo ok\nFOO bar\n", (), "Dockerfile:4: unknown instruction: FOO"),
    ("FROM lazybuild-test/python:bookworm\nENV\n", (), "Dockerfile:3: ENV requires at least one argument"),
    ("FROM lazybuild-test/python:bookworm AS a\nRUN true\n", ("--target", "nosuch"), "target stage 'nosuch' could not be found"),
    ("FROM lazybuild-test/python:bookworm\nCOPY --bogus=1 a /a\n", (), "Dockerfile:3: unknown flag: bogus"),
    ("FROM lazybuild-test/python:bookworm\nRUN --mount=type=cache echo\n", (), "Dockerfile:3: mount type cache requires a target"),
    ("FROM lazybuild-test/python:bookworm\nCOPY --exclude=*.log . /x\n", (), "Dockerfile:3: --exclude needs the BuildKit capability"),
    ("FROM lazybuild-test/python:bookworm\nCOPY --from=$X /a /b\n", (), "Dockerfile:3: COPY --from does not support variables"),
])
def test_bad_dockerfile_fails_with_our_message_and_line(dockerd, frontend_image, tmp_path, text, args, expected):
    p = _build_text(dockerd, frontend_image, tmp_path, text, {"a": "a"}, *args)
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0
    assert expected in err, err[-2000:]


def test_failing_run_reports_exit_code(dockerd, frontend_image, tmp_path):
    p = _build_text(dockerd, frontend_image, tmp_path, "FROM lazybuild-test/python:bookworm\nRUN exit 7\n")
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 and "exit code: 7" in err, err[-2000:]


def test_build_args_labels_and_no_cache(dockerd, frontend_image, tmp_path):
    """`--label` lands in the config (the frontend applies label: options) and --no-cache reruns RUN."""
    text = "FROM lazybuild-test/python:bookworm\nARG V=1\nRUN echo $V-$(date +%s%N) > /stamp\n"
    (tmp_path / "bad").mkdir()
    for _ in range(2):
        p = _build_text(dockerd, frontend_image, tmp_path, text, None, "--label", "org.test=yes", "--build-arg", "V=7",
                        "-t", "labels-test")
        assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert dockerd.image_config("labels-test")["Config"]["Labels"] == {"org.test": "yes"}
    first = dockerd.docker("run", "--rm", "labels-test", "cat", "/stamp").stdout
    assert first.startswith(b"7-")
    cached = _build_text(dockerd, frontend_image, tmp_path, text, None, "--build-arg", "V=7", "-t", "labels-test")
    assert dockerd.docker("run", "--rm", "labels-test", "cat", "/stamp").stdout == first, cached.stderr.decode()[-800:]
    _build_text(dockerd, frontend_image, tmp_path, text, None, "--build-arg", "V=7", "--no-cache", "-t", "labels-test")
    assert dockerd.docker("run", "--rm", "labels-test", "cat", "/stamp").stdout != first


def test_heredoc_contents(dockerd, frontend_image, tmp_path):
    """Heredocs (BuildKit's dockerfile 1.4 syntax) on a daemon whose built-in frontend predates them."""
    text = ("FROM lazybuild-test/python:bookworm\nENV WHO=world\nRUN <<EOF\necho \"run $WHO\" > /a\nEOF\n"
            "COPY <<-EOF /b\n\thello $WHO\n\tEOF\nRUN <<'EOF' python3\nimport os\nopen('/c', 'w').write('py')\nEOF\n")
    p = _build_text(dockerd, frontend_image, tmp_path, text, None, "-t", "heredoc-test")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    out = dockerd.docker("run", "--rm", "heredoc-test", "sh", "-c", "cat /a /b /c").stdout
    assert out == b"run world\nhello world\npy"


@pytest.fixture
def http_server(tmp_path):
    """A static file server on 127.0.0.1 (ADD URL and git over dumb HTTP read from it)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_add_url_with_checksum_and_git(dockerd, frontend_image, tmp_path, http_server):
    root, url = http_server
    (root / "file.txt").write_text("from http\n")
    good = "sha256:" + hashlib.sha256(b"from http\n").hexdigest()
    repo = root / "repo"
    subprocess.run(f"git init -q -b main {repo} && cd {repo} && echo tracked > t.txt && git add t.txt && "
                   "git -c user.name=t -c user.email=t@t commit -qm one && git update-server-info", shell=True, check=True)
    text = (f"FROM lazybuild-test/python:bookworm\nADD --checksum={good} {url}/file.txt /dl/\n"
            f"ADD {url}/repo/.git#main /src/\n")
    p = _build_text(dockerd, frontend_image, tmp_path, text, None, "-t", "add-url-test")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    out = dockerd.docker("run", "--rm", "add-url-test", "sh", "-c", "cat /dl/file.txt /src/t.txt; test ! -e /src/.git").stdout
    assert out == b"from http\ntracked\n"
    bad = text.replace(good, "sha256:" + "0" * 64)
    p = _build_text(dockerd, frontend_image, tmp_path, bad)
    assert p.returncode != 0 and b"digest mismatch" in p.stderr.lower(), p.stderr.decode()[-2000:]


def test_registry_base_pull_platform_and_add_hosts(dockerd, frontend_image, registry, tmp_path):
    """FROM an image in a registry with --pull (resolve mode pull), an explicit --platform, --add-host."""
    base = f"{registry.host}/base:bookworm"
    dockerd.docker("tag", "lazybuild-test/python:bookworm", base)
    dockerd.docker("push", base)
    text = f"FROM {base}\nRUN getent hosts lbtest.internal > /hosts && uname -m > /arch\n"
    p = _build_text(dockerd, frontend_image, tmp_path, text, None, "--pull", "--platform", "linux/amd64",
                    "--add-host", "lbtest.internal:127.0.0.9", "-t", "pull-test")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert f"load metadata for {base}" in p.stderr.decode()
    out = dockerd.docker("run", "--rm", "pull-test", "cat", "/hosts", "/arch").stdout.decode()
    assert out.split()[:2] == ["127.0.0.9", "lbtest.internal"] and out.split()[-1] == "x86_64"
    assert dockerd.image_config("pull-test")["Architecture"] == "amd64"


def test_engine_api_build_without_session(dockerd, frontend_image, tmp_path):
    """`POST /build?version=2` with a tar context (no session: the context is an HTTP upload that can be
    read once) works through the frontend too."""
    ctx = tmp_path / "api"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"# syntax={frontend_image}\nFROM lazybuild-test/python:bookworm\n"
                                    "COPY hello.txt /hello.txt\nRUN cat /hello.txt > /copy.txt\n")
    (ctx / "hello.txt").write_text("hello api\n")
    tar = tmp_path / "ctx.tar"
    subprocess.run(["tar", "-C", str(ctx), "-cf", str(tar), "."], check=True)
    p = subprocess.run(["curl", "-sS", "--unix-socket", dockerd.socket, "-X", "POST", "-H",
                        "Content-Type: application/x-tar", "--data-binary", f"@{tar}",
                        "http://localhost/v1.41/build?version=2&t=api-test&networkmode=host"],
                       capture_output=True, timeout=600)
    assert p.returncode == 0 and b"errorDetail" not in p.stdout, p.stdout.decode(errors="replace")[-3000:]
    out = dockerd.docker("run", "--rm", "api-test", "cat", "/copy.txt").stdout
    assert out == b"hello api\n"


def test_ssh_mount_reaches_the_clients_agent(dockerd, frontend_image, tmp_path):
    """RUN --mount=type=ssh forwards the client's agent socket (docker build --ssh default)."""
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            import time
            time.sleep(0.05)
        text = ("FROM lazybuild-test/python:bookworm\n"
                "RUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo \"$SSH_AUTH_SOCK\" > /agent\n")
        ctx = tmp_path / "ssh"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"# syntax={frontend_image}\n" + text)
        p = dockerd.docker("build", "--network=host", "--progress=plain", "--ssh", f"default={sock}", "-t", "ssh-test",
                           str(ctx), check=False)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert dockerd.docker("run", "--rm", "ssh-test", "cat", "/agent").stdout == b"/run/buildkit/ssh_agent.0\n"
    finally:
        agent.terminate()


def test_result_as_a_platform_map(dockerd, frontend_image, tmp_path):
    """With BUILDKIT_MULTI_PLATFORM the result is a map with refs.platforms, which Docker 20.10's exporter
    accepts for one platform. (Several platforms at once are refused by Docker 20.10 itself.)"""
    text = "FROM lazybuild-test/python:bookworm\nRUN echo map > /m\n"
    p = _build_text(dockerd, frontend_image, tmp_path, text, None, "--build-arg", "BUILDKIT_MULTI_PLATFORM=1",
                    "-t", "map-test")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert dockerd.docker("run", "--rm", "map-test", "cat", "/m").stdout == b"map\n"
