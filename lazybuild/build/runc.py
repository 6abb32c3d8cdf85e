"""Run one RUN step under runc: an OCI runtime spec for a root filesystem we prepared, as BuildKit's
runc executor would write it (namespaces, /proc /dev /sys, the default capabilities, resolv.conf and
hosts), run in the foreground with its output streamed, and always deleted afterwards."""

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

RUNC_ROOT = "/run/lazybuild/runc"
HOSTNAME = "buildkitsandbox"
CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READONLY = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class RunError(RuntimeError):
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
    """`name|uid[:group|gid]` -> ids, looked up in the root filesystem's /etc/passwd and /etc/group."""
    if not spec:
        return User(0, 0, [0])
    user, _, group = spec.partition(":")
    passwd = _table(os.path.join(rootfs, "etc/passwd"))
    groups = _table(os.path.join(rootfs, "etc/group"))
    name = None
    if user.isdigit():
        uid, gid = int(user), 0
        for row in passwd:
            if len(row) > 3 and row[2] == user:
                name, gid = row[0], int(row[3])
                break
    else:
        row = next((r for r in passwd if r and r[0] == user and len(r) > 3), None)
        if row is None:
            raise ValueError(f"unable to find user {user}: no matching entries in /etc/passwd")
        name, uid, gid = user, int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((r for r in groups if r and r[0] == group and len(r) > 2), None)
            if grow is None:
                raise ValueError(f"unable to find group {group}: no matching entries in /etc/group")
            gid = int(grow[2])
    extra = [gid]
    if name and not group:
        extra += [int(r[2]) for r in groups if len(r) > 3 and name in r[3].split(",") and int(r[2]) != gid]
    return User(uid, gid, extra)


def _table(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def spec(rootfs: str, args: list[str], env: list[str], cwd: str, user: User, mounts: list[Mount],
         network: str, hosts_file: str, resolv_file: str) -> dict:
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "none":
        namespaces.append({"type": "network"})
    base_mounts = [
        Mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        Mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        Mount("/dev/shm", "shm", "tmpfs", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        Mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        Mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        Mount("/etc/resolv.conf", resolv_file, "bind", ["rbind", "ro"]),
        Mount("/etc/hosts", hosts_file, "bind", ["rbind", "ro"]),
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": args, "env": env, "cwd": cwd or "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": HOSTNAME,
        "mounts": [m.to_json() for m in base_mounts + mounts],
        "linux": {"namespaces": namespaces, "maskedPaths": MASKED, "readonlyPaths": READONLY},
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
        _ensure_cwd(rootfs, cwd or "/", user)
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
        subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def _ensure_cwd(rootfs: str, cwd: str, user: User) -> None:
    """BuildKit creates a missing working directory before it runs the command."""
    path = os.path.join(rootfs, cwd.lstrip("/"))
    if not os.path.lexists(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
