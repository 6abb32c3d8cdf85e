"""Build contexts that are not a local directory, as `docker build` takes them: a git repository
(`git://…`, `git@…`, `https://….git`, with `#REF:SUBDIR`) cloned shallowly, or an http(s) URL of a tar
archive (gzip, bzip2, xz) unpacked, or of a plain Dockerfile (then the context is empty).

Both come from strangers: the download is capped, the archive is unpacked by the ADD extraction
(`filecopy.unpack_archive`: names that climb out, entries under a link the archive made and hardlinks
out are refused) with a cap on what it writes, and the git subdirectory is resolved inside the clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass

import httpx

from lazybuild import inroot
from lazybuild.errors import HostError, InputError, RemoteError

from .filecopy import CopyError, unpack_archive

MAX_DOWNLOAD = 1 << 30  # a context archive over 1 GiB compressed is refused while it downloads
MAX_UNPACKED = 8 << 30  # and what it unpacks to is capped at 8 GiB
MAX_DOCKERFILE = 16 << 20  # a URL that is not an archive is a Dockerfile, at most this big
GIT_TIMEOUT_S = 600


class ContextError(InputError):
    hint = ("a context is a directory, an http(s) URL of a tar archive or of a Dockerfile, or a git URL "
            "(git://…, git@…, https://….git) with an optional #REF:SUBDIR")


@dataclass(frozen=True)
class GitContext:
    url: str
    ref: str = ""
    subdir: str = ""


def is_git(text: str) -> bool:
    """Docker's rule: git://, git@, or an http(s) URL whose path ends in .git (a fragment allowed)."""
    if text.startswith(("git://", "git@", "ssh://")):
        return True
    return bool(re.match(r"https?://", text)) and text.split("#", 1)[0].endswith(".git")


def is_remote(text: str) -> bool:
    return is_git(text) or bool(re.match(r"https?://", text))


def parse_git(text: str) -> GitContext:
    url, _, fragment = text.partition("#")
    ref, _, subdir = fragment.partition(":")
    if ref.startswith("-") or url.startswith("-"):  # never an option of git's
        raise ContextError(f"{text}: a git URL or ref cannot start with '-'")
    return GitContext(url, ref, subdir)


def prepare(text: str, workdir: str, log=lambda s: None) -> str:
    """The local directory of the context TEXT: TEXT itself when it is a path, else fetched under WORKDIR."""
    if not is_remote(text):
        return text
    target = os.path.join(workdir, "context")
    os.makedirs(target)
    if is_git(text):
        git = parse_git(text)
        _clone(git, target, log)
        root = target
        if git.subdir:
            root = inroot.resolve(target, git.subdir)
            if not os.path.isdir(root):
                raise ContextError(f"{text}: {git.subdir} is not a directory of the repository")
        return root
    _download(text, target, workdir, log)
    return target


def _clone(git: GitContext, target: str, log) -> None:
    exe = shutil.which("git")
    if exe is None:
        raise HostError(f"{git.url}: a git context needs git on PATH", hint="install git (apt-get install git)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}

    def run(*args: str) -> None:
        # no submodules, no hooks from the repository, no prompt: a context is data
        p = subprocess.run([exe, "-c", "core.hooksPath=/dev/null", *args], cwd=target, env=env,
                           capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        if p.returncode != 0:
            raise RemoteError(f"{git.url}: git {args[0]} failed: {(p.stderr or p.stdout).strip()[-2000:]}")

    log(f"cloning {git.url}{' at ' + git.ref if git.ref else ''} (depth 1)")
    run("init", "-q")
    run("remote", "add", "origin", git.url)
    run("fetch", "-q", "--depth", "1", "--no-recurse-submodules", "origin", git.ref or "HEAD")
    run("checkout", "-q", "FETCH_HEAD")
    shutil.rmtree(os.path.join(target, ".git"))  # as BuildKit: the context is the tree, not the repository


def _download(url: str, target: str, workdir: str, log) -> None:
    path = os.path.join(workdir, "download")
    log(f"downloading the context {url}")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
            if r.status_code != 200:
                raise RemoteError(f"{url}: HTTP {r.status_code}")
            size = 0
            with open(path, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD:
                        raise ContextError(f"{url}: over {MAX_DOWNLOAD >> 20} MiB, the cap for a context archive")
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise RemoteError(f"{url}: {e}") from None
    if _is_tar(path):
        try:
            unpack_archive(path, target, url, limit=MAX_UNPACKED)
        except CopyError as e:
            raise ContextError(str(e)) from None
        return
    if os.path.getsize(path) > MAX_DOCKERFILE:
        raise ContextError(f"{url}: neither a tar archive nor a Dockerfile (over {MAX_DOCKERFILE >> 20} MiB)")
    os.replace(path, os.path.join(target, "Dockerfile"))  # docker build URL-of-a-Dockerfile: an empty context


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False
