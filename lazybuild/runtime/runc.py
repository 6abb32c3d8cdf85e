"""Run one RUN step under runc: an OCI runtime spec for a root filesystem we prepared, as BuildKit's
runc executor would write it, run in the foreground with its output streamed, and always deleted
afterwards.

The step runs code that strangers wrote (the base image, the Dockerfile) as root on the host's
kernel, so it gets what BuildKit gives it by default and nothing more: its own pid, ipc, uts and
mount namespaces, Docker's 14 default capabilities, Docker's default seccomp profile (seccomp.py),
no_new_privileges, /proc paths that leak host state masked and those that configure the host
read-only, /sys and the cgroup tree read-only. Whatever is read from the image to write the spec
(its /etc/passwd and /etc/group, the working directory to create) is resolved inside the image's
tree by lazybuild.inroot, never on the host.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass, field

from .. import inroot
from ..errors import BuildFailure
from . import seccomp

RUNC_ROOT = "/run/lazybuild/runc"
HOSTNAME = "buildkitsandbox"
# Docker's default capability set (moby oci/defaults.go, containerd oci/spec.go). BuildKit gives it
# as the bounding, effective and permitted sets only: since the fix of CVE-2022-24769 (containerd
# 1.5.11 and 1.6.2, whose defaults BuildKit takes) the inheritable set is empty; the ambient set
# always was.
CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
# containerd's default masked and read-only paths (oci/spec.go), which BuildKit's spec starts from.
# Masked: runc mounts /dev/null over a file and an empty read-only tmpfs over a directory, so the
# host's kernel memory, keyrings, timers, firmware tables and power meters (RAPL readings leak
# secrets, CVE-2020-8694) cannot be read. Read-only: the files that would change the host kernel's
# settings for everyone (sysctls, sysrq, irq affinity). A path this kernel lacks is skipped.
MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# BuildKit's executor resets this to false so that setuid programs (sudo, su) keep working in RUN
# steps; issue 14 asks for it set: a setuid or file-capability binary in an untrusted base image
# then cannot raise a step that runs as a non-root USER. The cost is that such a step cannot use
# sudo either, where BuildKit would let it.
NO_NEW_PRIVILEGES = True

# The image's /etc/passwd and /etc/group are read before anything checked them: read at most this.
ACCOUNT_FILE_LIMIT = 1 << 20


class RunError(BuildFailure):
    """A RUN step exited non-zero: the command, its exit code and the last lines it printed."""

    def __init__(self, args: list[str], code: int, tail: list[str]):
        self.args_, self.code, self.tail = args, code, tail
        shown = "\n".join("  " + line for line in tail)
        super().__init__(f"RUN {json.dumps(args)} failed with exit code {code}" + (f"; last output:\n{shown}" if tail else ""))


@dataclass
class Mount:
    destination: str
    source: str = ""
    type: str = "bind"  # bind | tmpfs
    options: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"destination": self.destination, "type": self.type, "source": self.source or self.type,
                "options": self.options}


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)


def resolve_user(rootfs: str, spec: str) -> User:
    """`name|uid[:group|gid]` -> ids, looked up in the root filesystem's /etc/passwd and /etc/group.

    The two files are the image's: read inside ROOTFS (a symlink in them resolves within the
    image, never to a host file) and at most ACCOUNT_FILE_LIMIT bytes each."""
    if not spec:
        return User(0, 0, [0])
    user, _, group = spec.partition(":")
    passwd = _table(rootfs, "/etc/passwd")
    groups = _table(rootfs, "/etc/group")
    name = None
    if _is_id(user):
        uid, gid = int(user), 0
        for row in passwd:
            if len(row) > 3 and row[2] == user and _is_id(row[3]):
                name, gid = row[0], int(row[3])
                break
    else:
        row = next((r for r in passwd if r and r[0] == user and len(r) > 3), None)
        if row is None:
            raise ValueError(f"unable to find user {user}: no matching entries in /etc/passwd")
        if not (_is_id(row[2]) and _is_id(row[3])):
            raise ValueError(f"user {user} in /etc/passwd has a uid or gid that is not a number: {row[2]!r}:{row[3]!r}")
        name, uid, gid = user, int(row[2]), int(row[3])
    if group:
        if _is_id(group):
            gid = int(group)
        else:
            grow = next((r for r in groups if r and r[0] == group and len(r) > 2 and _is_id(r[2])), None)
            if grow is None:
                raise ValueError(f"unable to find group {group}: no matching entries in /etc/group")
            gid = int(grow[2])
    extra = [gid]
    if name and not group:
        extra += [int(r[2]) for r in groups
                  if len(r) > 3 and _is_id(r[2]) and name in r[3].split(",") and int(r[2]) != gid]
    return User(uid, gid, extra)


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone takes "²", which int() refuses


def _table(rootfs: str, path: str) -> list[list[str]]:
    """The rows of an account file in the image; none when the image has no such file."""
    try:
        data = inroot.read_file(rootfs, path, ACCOUNT_FILE_LIMIT)
    except OSError as e:  # too large, a symlink loop, unreadable
        raise ValueError(f"cannot read {path} of the image: {e.strerror or e}") from None
    if data is None:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line.split(":") for line in lines if line.strip() and not line.startswith("#")]


def spec(rootfs: str, args: list[str], env: list[str], cwd: str, user: User, mounts: list[Mount],
         network: str, hosts_file: str, resolv_file: str) -> dict:
    """The OCI runtime spec of one step: BuildKit's (executor/oci GenerateSpec on containerd's
    defaults) for a sandboxed step, with lazybuild's mounts after its own."""
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "none":
        namespaces.append({"type": "network"})
    # BuildKit's GetMounts, then its read-only binds of resolv.conf and hosts and the cgroup tree.
    # /dev is the one without noexec and nodev: it holds the device nodes runc creates.
    base_mounts = [
        Mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        Mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        Mount("/dev/shm", "shm", "tmpfs", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        Mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        Mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        Mount("/etc/resolv.conf", resolv_file, "bind", ["nosuid", "noexec", "nodev", "rbind", "ro"]),
        Mount("/etc/hosts", hosts_file, "bind", ["nosuid", "noexec", "nodev", "rbind", "ro"]),
        Mount("/sys/fs/cgroup", "cgroup", "cgroup", ["ro", "nosuid", "noexec", "nodev"]),
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": args, "env": env, "cwd": cwd or "/",
            "capabilities": {k: list(CAPABILITIES) for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": NO_NEW_PRIVILEGES,
            # No rlimits: BuildKit drops containerd's RLIMIT_NOFILE 1024 so that a step inherits
            # the builder's own limits (what `docker build` users see); so does lazybuild.
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": HOSTNAME,
        "mounts": [m.to_json() for m in base_mounts + mounts],
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
            "seccomp": seccomp.profile(CAPABILITIES),
        },
    }


def run(rootfs: str, args: list[str], env: list[str], cwd: str, user_spec: str, mounts: list[Mount],
        network: str = "host", extra_hosts: list[tuple[str, str]] = (), output=None,
        timeout_s: float | None = None) -> None:
    """Run ARGS in ROOTFS; each output line goes to `output(line)`. Raises RunError on a non-zero exit.
    With `timeout_s` the container is killed when the time is up, which is not an error (a workload
    run for a period). The container is deleted whatever happens (exit, error, Ctrl-C)."""
    user = resolve_user(rootfs, user_spec)
    bundle = tempfile.mkdtemp(prefix="lazybuild-run-")
    cid = "lazybuild-" + uuid.uuid4().hex[:16]
    os.makedirs(RUNC_ROOT, exist_ok=True)
    try:
        hosts = os.path.join(bundle, "hosts")
        with open(hosts, "w") as f:
            f.write(f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
            for name, ip in extra_hosts:
                f.write(f"{ip}\t{name}\n")
        resolv = os.path.join(bundle, "resolv.conf")
        shutil.copyfile("/etc/resolv.conf", resolv) if os.path.exists("/etc/resolv.conf") else open(resolv, "w").close()
        _ensure_cwd(rootfs, cwd or "/")
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec(rootfs, args, env, cwd, user, list(mounts), network, hosts, resolv), f)
        tail: collections.deque[str] = collections.deque(maxlen=20)
        proc = subprocess.Popen(["runc", "--root", RUNC_ROOT, "run", "--bundle", bundle, cid],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer, expired = None, threading.Event()

        def expire() -> None:
            expired.set()
            subprocess.run(["runc", "--root", RUNC_ROOT, "kill", cid, "KILL"], capture_output=True)

        if timeout_s is not None:
            timer = threading.Timer(timeout_s, expire)
            timer.daemon = True
            timer.start()
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                if output:
                    output(line)
            code = proc.wait()
        except BaseException:
            subprocess.run(["runc", "--root", RUNC_ROOT, "kill", cid, "KILL"], capture_output=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if code != 0 and not expired.is_set():
            raise RunError(args, code, list(tail))
    finally:
        # `runc run` deletes its container when the process exits; its state dir is left only when runc
        # was stopped mid-way: then (and only then: a runc process costs 10-30 ms) delete it ourselves.
        if os.path.exists(os.path.join(RUNC_ROOT, cid)):
            subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def _ensure_cwd(rootfs: str, cwd: str) -> None:
    """BuildKit creates a missing working directory (root's, 0755) before it runs the command. The
    path is the image's: a symlink on the way (`/app/sub -> /etc/cron.d`) is followed inside
    ROOTFS, so the directory is made in the image, never on the host."""
    try:
        inroot.mkdir_all(rootfs, cwd, 0o755)
    except inroot.UnsafePath as e:
        raise ValueError(f"cannot make the working directory {cwd}: {e.strerror}") from None
