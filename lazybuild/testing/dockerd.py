"""A real Docker daemon (Debian docker.io 20.10, BuildKit v0.8 inside) for the frontend tests, bench and demo:
its own data root, exec root and socket, and no bridge network (it would take 172.17/16), so it never
touches a system dockerd. Builds go through the Debian 20.10 CLI, which drives BuildKit with a session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from lazybuild.testing.images import debootstrap_rootfs
from lazybuild.testing.procs import stop_process

DOCKER = "/usr/bin/docker"  # the 20.10 CLI; another `docker` on PATH may need buildx, which is absent


class Dockerd:
    def __init__(self, workdir: str, extra_args: list[str] = ()):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "docker.sock")
        # The exec root holds containerd's socket path, which must stay under 108 bytes: keep it short.
        self.exec_root = tempfile.mkdtemp(prefix="lbd-", dir="/run")
        self.log = open(os.path.join(workdir, "dockerd.log"), "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
             "--data-root", os.path.join(workdir, "data"), "--exec-root", self.exec_root,
             "--pidfile", os.path.join(workdir, "dockerd.pid"), "-H", f"unix://{self.socket}",
             "--storage-driver=overlay2", "--log-level=warn", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.proc.returncode}); see {self.log.name}")
            if os.path.exists(self.socket) and self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer on {self.socket} within 60 s; see {self.log.name}")

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, DOCKER_HOST=f"unix://{self.socket}", DOCKER_BUILDKIT="1",
                   DOCKER_CONFIG=os.path.join(self.workdir, "client-config"))
        env.update(extra)
        return env

    def docker(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 900,
               env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([DOCKER, *args], input=input, capture_output=True, timeout=timeout, env=env or self.env())
        if check and p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stderr.decode(errors='replace')[-4000:]}")
        return p

    def build(self, context: str, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        """`docker build --network=host --progress=plain ARGS CONTEXT` with BuildKit."""
        return self.docker("build", "--network=host", "--progress=plain", *args, context, check=check, timeout=timeout)

    def import_rootfs(self, tar: str, ref: str) -> None:
        """`docker import` a root filesystem tar as REF."""
        with open(tar, "rb") as f:
            p = subprocess.run([DOCKER, "import", "-", ref], stdin=f, capture_output=True, env=self.env())
        if p.returncode != 0:
            raise RuntimeError(f"docker import {ref} failed: {p.stderr.decode(errors='replace')}")

    def image_config(self, ref: str) -> dict:
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def export_fs(self, ref: str, out: str) -> str:
        """The image's filesystem as a tar (`docker create` + `docker export`)."""
        cid = self.docker("create", ref, "/nonexistent").stdout.decode().strip()
        try:
            with open(out, "wb") as f:
                p = subprocess.run([DOCKER, "export", cid], stdout=f, stderr=subprocess.PIPE, env=self.env())
            if p.returncode != 0:
                raise RuntimeError(f"docker export failed: {p.stderr.decode(errors='replace')}")
        finally:
            self.docker("rm", cid, check=False)
        return out

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        subprocess.run(["umount", "-R", self.exec_root], capture_output=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)


# The checkout this package runs from (an editable install): push_frontend_image needs its Dockerfile and scripts/.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_IMAGE = "lazybuild-test/python:bookworm"  # Debian bookworm minbase + python3 + python3-venv


def start_with_base(workdir: str) -> Dockerd:
    """A daemon with the Debian test base image (debootstrap, cached) imported as BASE_IMAGE."""
    d = Dockerd(workdir)
    try:
        d.import_rootfs(debootstrap_rootfs(("python3", "python3-venv")), BASE_IMAGE)
    except Exception:
        d.stop()
        raise
    return d


def push_frontend_image(d: Dockerd, ref: str) -> str:
    """Build the frontend image from the top-level Dockerfile on BASE_IMAGE, push it to REF's registry and
    drop the local copy, so `# syntax=REF` makes BuildKit pull it as a user's build would. Needs a checkout
    (an editable install): the image is built from its Dockerfile by scripts/frontend-image.sh."""
    script = os.path.join(REPO, "scripts", "frontend-image.sh")
    if not os.path.exists(script):
        raise RuntimeError(f"{script} not found: push_frontend_image builds from a checkout (pip install -e)")
    p = subprocess.run(["bash", script, ref, "--python-image", BASE_IMAGE,
                        "--push"], env=d.env(), capture_output=True)
    if p.returncode != 0:
        raise RuntimeError("building the frontend image failed:\n" + (p.stdout + p.stderr).decode(errors="replace")[-4000:])
    d.docker("rmi", ref)
    return ref
