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
    def __init__(self, workdir: str, extra_args: list[str] = (), *, insecure_entitlement: bool = False):
        """INSECURE_ENTITLEMENT: let builds that ask for it run steps with security.insecure (daemon.json
        `"builder": {"entitlements": {"security-insecure": true}}`, Docker 20.10's setting). The classic
        `docker build` never asks for it: such a build goes through BuildKit's control API (as buildx's
        docker driver does) with the entitlement in its request."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        env = None
        if insecure_entitlement:
            config = os.path.join(workdir, "daemon.json")
            with open(config, "w") as f:
                json.dump({"builder": {"entitlements": {"security-insecure": True}}}, f)
            extra_args = [*extra_args, "--config-file", config]
            env = dict(os.environ, PATH=_capped_runc(workdir) + os.pathsep + os.environ.get("PATH", ""))
        self.socket = os.path.join(workdir, "docker.sock")
        # The exec root holds containerd's socket path, which must stay under 108 bytes: keep it short.
        self.exec_root = tempfile.mkdtemp(prefix="lbd-", dir="/run")
        self.log = open(os.path.join(workdir, "dockerd.log"), "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
             "--data-root", os.path.join(workdir, "data"), "--exec-root", self.exec_root,
             "--pidfile", os.path.join(workdir, "dockerd.pid"), "-H", f"unix://{self.socket}",
             "--storage-driver=overlay2", "--log-level=warn", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
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


# An insecure step asks runc for every capability BuildKit knows (its list is fixed); where this process's
# bounding set lacks one (a sandboxed CI or VM), runc fails with "unable to apply caps". The daemon that
# grants security.insecure finds this runc first on its PATH: it keeps only the capabilities the machine
# has, then runs the real one. Specs that ask for no more than that are passed on untouched.
_RUNC_WRAPPER = """#!/usr/bin/python3
import json, os, sys
REAL = {real!r}
args = sys.argv[1:]
bundle = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--bundle", "-b")), None)
if bundle and os.path.exists(os.path.join(bundle, "config.json")):
    with open("/proc/self/status") as f:
        bnd = int(next(l for l in f if l.startswith("CapBnd:")).split()[1], 16)
    names = {{"CAP_" + n.upper(): i for i, n in enumerate({names!r})}}
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    caps = (spec.get("process") or {{}}).get("capabilities") or {{}}
    kept = {{k: [c for c in v if c not in names or bnd >> names[c] & 1] for k, v in caps.items() if isinstance(v, list)}}
    if any(len(kept[k]) != len(caps[k]) for k in kept):
        caps.update(kept)
        with open(path + ".tmp", "w") as f:
            json.dump(spec, f)
        os.replace(path + ".tmp", path)
os.execv(REAL, [REAL] + args)
"""
# capability(7) numbers 0..40, by name
_CAP_NAMES = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
              "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
              "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
              "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write", "audit_control",
              "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
              "perfmon", "bpf", "checkpoint_restore"]


def _capped_runc(workdir: str) -> str:
    """A directory holding the runc wrapper above (see there); returns it."""
    real = shutil.which("runc")
    if real is None:
        raise RuntimeError("runc not found on PATH")
    bindir = os.path.join(workdir, "runc-capped")
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, "runc")
    with open(path, "w") as f:
        f.write(_RUNC_WRAPPER.format(real=real, names=_CAP_NAMES))
    os.chmod(path, 0o755)
    return bindir


# The checkout this package runs from (an editable install): push_frontend_image needs its Dockerfile and scripts/.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_IMAGE = "lazybuild-test/python:bookworm"  # Debian bookworm minbase + python3 + python3-venv


def start_with_base(workdir: str, *, insecure_entitlement: bool = False) -> Dockerd:
    """A daemon with the Debian test base image (debootstrap, cached) imported as BASE_IMAGE."""
    d = Dockerd(workdir, insecure_entitlement=insecure_entitlement)
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
