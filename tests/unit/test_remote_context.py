"""Remote build contexts (builder/remote_context.py): which texts are git or URLs, and the fetches against a
loopback http.server and a git repository on disk: archives unpacked safely and capped, a URL of a Dockerfile,
a git ref and subdirectory, and what is refused."""

from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import tarfile
import threading

import pytest

from lazybuild.builder import remote_context
from lazybuild.builder.remote_context import ContextError, GitContext, is_git, is_remote, parse_git, prepare


@pytest.mark.parametrize("text, git, remote", [
    ("git://host/repo", True, True),
    ("git@github.com:a/b.git", True, True),
    ("https://host/a/b.git#main:sub", True, True),
    ("https://host/ctx.tar.gz", False, True),
    ("http://host/Dockerfile", False, True),
    ("./dir", False, False),
    ("/abs/dir.git", False, False),
])
def test_kinds(text, git, remote):
    assert is_git(text) is git and is_remote(text) is remote


def test_git_fragment():
    assert parse_git("https://h/r.git#v1:a/b") == GitContext("https://h/r.git", "v1", "a/b")
    assert parse_git("git://h/r") == GitContext("git://h/r")
    with pytest.raises(ContextError, match="cannot start with '-'"):
        parse_git("git://h/r#--upload-pack=touch /tmp/x")


def test_a_path_is_left_alone(tmp_path):
    assert prepare("some/dir", str(tmp_path)) == "some/dir" and os.listdir(tmp_path) == []


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _tar(path, entries, mode="w:gz"):
    with tarfile.open(path, mode) as tf:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_archive_and_dockerfile_urls(http_dir, tmp_path):
    root, base = http_dir
    _tar(root / "ctx.tar.gz", [("Dockerfile", b"FROM scratch\nCOPY a /a\n", tarfile.REGTYPE),
                               ("a", b"A\n", tarfile.REGTYPE)])
    ctx = prepare(f"{base}/ctx.tar.gz", str(tmp_path / "w1"))
    assert sorted(os.listdir(ctx)) == ["Dockerfile", "a"] and open(os.path.join(ctx, "a")).read() == "A\n"
    (root / "Dockerfile").write_text("FROM scratch\n")
    ctx = prepare(f"{base}/Dockerfile", str(tmp_path / "w2"))
    assert os.listdir(ctx) == ["Dockerfile"]
    with pytest.raises(Exception, match="HTTP 404"):
        prepare(f"{base}/missing.tar", str(tmp_path / "w3"))


@pytest.mark.parametrize("entries, message", [
    ([("../escape", b"x", tarfile.REGTYPE)], "would leave the destination"),
    ([("l", "/", tarfile.SYMTYPE), ("l/etc/x", b"x", tarfile.REGTYPE)], "under a symlink the archive made"),
    ([("h", "../../etc/passwd", tarfile.LNKTYPE)], "points out of the destination"),
])
def test_hostile_archives_are_refused(http_dir, tmp_path, canary, entries, message):
    root, base = http_dir
    _tar(root / "evil.tar", entries, "w")
    with pytest.raises(ContextError, match=message):
        prepare(f"{base}/evil.tar", str(tmp_path / "w"))


def test_caps(http_dir, tmp_path, monkeypatch):
    root, base = http_dir
    _tar(root / "big.tar.gz", [("zeros", b"\0" * (3 << 20), tarfile.REGTYPE)])  # a few KiB that inflate to 3 MiB
    monkeypatch.setattr(remote_context, "MAX_UNPACKED", 2 << 20)
    with pytest.raises(ContextError, match="unpacks to over 2 MiB"):
        prepare(f"{base}/big.tar.gz", str(tmp_path / "w1"))
    monkeypatch.setattr(remote_context, "MAX_DOWNLOAD", 1 << 10)
    (root / "large").write_bytes(os.urandom(4 << 10))
    with pytest.raises(ContextError, match="the cap for a context archive"):
        prepare(f"{base}/large", str(tmp_path / "w2"))


def test_git_file_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (repo / "sub").mkdir()
    (repo / "sub" / "Dockerfile").write_text("FROM scratch\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    git("tag", "v1")
    (repo / "sub" / "later").write_text("later\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    # git:// through a loopback git daemon is the integration test's; here the clone itself, through file://
    at_tag = GitContext(f"file://{repo}", "v1", "sub")
    target = tmp_path / "w1" / "context"
    target.mkdir(parents=True)
    remote_context._clone(at_tag, str(target), lambda s: None)
    assert sorted(os.listdir(target / "sub")) == ["Dockerfile"] and not (target / ".git").exists()
    with pytest.raises(Exception, match="git fetch failed"):
        target2 = tmp_path / "w2"
        target2.mkdir()
        remote_context._clone(GitContext(f"file://{repo}", "no-such-ref"), str(target2), lambda s: None)
