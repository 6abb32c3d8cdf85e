"""Run an image's workload on its built filesystem and record, in first-open order, the files it opens
(`LAZYBUILD_OPTIMIZE` in BuildKit's export step), as `ctr-remote image optimize` does with fanotify.

The export step runs privileged (the security.insecure entitlement: fanotify and mounts need
CAP_SYS_ADMIN). One forked recorder process does the work, so the exporter itself gains no mount, no
namespace and no stray process:

- recorder: new mount and PID namespaces; a tmpfs holding an overlay whose only lower is the final
  state (read-only, never written: the workload's writes land on the tmpfs), a minimal /dev (the usual
  nodes bound from the container's) and the container's resolv.conf and hosts bound over the image's; a fanotify group with a
  FAN_MARK_FILESYSTEM mark on the overlay (the workload's own mount namespace holds copies of the
  overlay mount, which a per-mount mark would miss; the superblock is the same);
- workload (PID 1 of the new PID namespace): its own mount namespace, a fresh /proc, pivot_root into
  the overlay (no way back to the container's root, which a chroot would leave), the capability
  bounding set cut to Docker's default less CAP_MKNOD, no_new_privs, the image's USER (looked up in the image's own
  /etc/passwd), WORKDIR and Env, then exec;
- the recorder reads events until the period ends or the workload exits, then kills the workload
  (PID 1's death takes every process of its namespace along), maps each event's file descriptor to its
  path through /proc/self/fd, keeps regular files, and writes the paths as JSON to the exporter.

ctypes, not a library: no maintained Python package wraps fanotify_init/fanotify_mark, pivot_root or
capset, and each is one system call here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass

from lazybuild import inroot
from lazybuild.errors import BuildFailure
from lazybuild.runtime.runc import resolve_user

# <linux/fanotify.h>
FAN_CLOEXEC, FAN_NONBLOCK, FAN_CLASS_NOTIF = 0x1, 0x2, 0x0
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_OPEN, FAN_OPEN_EXEC, FAN_Q_OVERFLOW = 0x20, 0x1000, 0x4000
FAN_NOFD = -1
# struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16, mask u64, fd s32, pid s32
EVENT = struct.Struct("=IBBHQii")
FANOTIFY_METADATA_VERSION = 3
# sched.h / mount.h
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
SYS_PIVOT_ROOT = 155  # x86_64; other architectures below
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}

# Docker's default capabilities (the set a RUN step gets) less CAP_MKNOD: an insecure step's cgroup may
# allow every device, so the workload makes none. Everything else leaves the bounding set.
DEFAULT_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31}  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID
# SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT AUDIT_WRITE SETFCAP
# The device nodes the workload gets (bound from the export step's /dev), as a container's minimal /dev.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
LAST_CAP_FALLBACK = 40

MAX_PATHS = 100_000  # a bound on what one recording keeps (and sends to the exporter)
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TMPFS_SIZE = "1g"  # the workload's writes; tmpfs takes memory only as they come


class WorkloadError(BuildFailure):
    """The workload could not be run or recorded (not: it exited non-zero, which still read what it read)."""


@dataclass(frozen=True)
class Workload:
    """What runs: argv, environment (`K=V`), working directory and user, all from the image config
    unless the build named a command; and for how long at most."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str
    period_s: float

    @classmethod
    def from_config(cls, image_config: dict, cmd: list[str], period_s: float) -> "Workload":
        cfg = image_config.get("config") or {}
        argv = list(cmd) or list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
        if not argv:
            raise WorkloadError("LAZYBUILD_OPTIMIZE: the image has no ENTRYPOINT or CMD to run",
                                hint="give the workload in LAZYBUILD_OPTIMIZE_CMD (a JSON array or a shell command)")
        env = [e for e in cfg.get("Env") or [] if isinstance(e, str) and "=" in e]
        if not any(e.startswith("PATH=") for e in env):
            env.insert(0, DEFAULT_PATH)
        return cls(tuple(argv), tuple(env), cfg.get("WorkingDir") or "/", cfg.get("User") or "", float(period_s))


# ---- the events (pure: unit-tested)

@dataclass(frozen=True)
class Event:
    mask: int
    fd: int
    pid: int


def parse_events(buf: bytes) -> list[Event]:
    """The events of one read(2) of a fanotify fd. A record whose length is short or runs past the
    buffer ends the parse (the kernel never writes one; nothing is guessed)."""
    out = []
    pos = 0
    while pos + EVENT.size <= len(buf):
        length, vers, _, meta_len, mask, fd, pid = EVENT.unpack_from(buf, pos)
        if vers != FANOTIFY_METADATA_VERSION or length < EVENT.size or meta_len < EVENT.size or pos + length > len(buf):
            break
        out.append(Event(mask, fd, pid))
        pos += length
    return out


def tree_path(link: str, root: str) -> str | None:
    """The path inside the tree (no leading `/`) that a /proc/self/fd link of an event names, or None
    when the file was deleted since it was opened. Only the overlay's filesystem is marked, so every
    event is a file of the tree: opened before the workload's pivot_root it reads ROOT/..., after it
    (the overlay is the workload's `/`, in a mount namespace the recorder does not see) it reads as the
    workload saw it."""
    if link.endswith(" (deleted)") or not link.startswith("/"):
        return None
    root = root.rstrip("/")
    if link.startswith(root + "/"):
        link = link[len(root):]
    return link.lstrip("/") or None


class Recording:
    """Paths in first-open order, each once, at most LIMIT."""

    def __init__(self, limit: int = MAX_PATHS):
        self.limit = limit
        self.paths: list[str] = []
        self._seen: set[str] = set()

    def add(self, path: str) -> None:
        if path not in self._seen and len(self.paths) < self.limit:
            self._seen.add(path)
            self.paths.append(path)


# ---- the system calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return result


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")  # os.unshare is Python 3.12+; the frontend image has 3.11


def _umount(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH)


def fanotify_open(root: str) -> int:
    """A fanotify group told of every open on ROOT's filesystem (FAN_OPEN_EXEC too where the kernel has it)."""
    fd = _libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fanotify_init: {os.strerror(e)}")
    for mask in (FAN_OPEN | FAN_OPEN_EXEC, FAN_OPEN):  # FAN_OPEN_EXEC: Linux 5.0; exec opens are FAN_OPEN too
        if _libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, -100, root.encode()) == 0:
            return fd
        e = ctypes.get_errno()
        if e != errno.EINVAL:
            break
    os.close(fd)
    raise OSError(e, f"fanotify_mark {root}: {os.strerror(e)}")


def _drop_capabilities() -> None:
    """Cut the bounding set to Docker's default and clear the ambient set: exec then leaves the workload
    (root or not) no capability outside the default, CAP_SYS_ADMIN first among them."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = LAST_CAP_FALLBACK
    for cap in range(last + 1):
        if cap not in DEFAULT_CAPS:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _pivot_root(new_root: str) -> None:
    nr = _PIVOT_ROOT.get(os.uname().machine, SYS_PIVOT_ROOT)
    os.chdir(new_root)
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")  # the old root is stacked under the new one...
    _check(_libc.umount2(b".", MNT_DETACH), "unmount the old root")  # ...and detached from it
    os.chdir("/")


# ---- the recorder

def _bind_file(host: str, merged: str, path: str) -> None:
    """Bind the container's HOST file over PATH in the tree (made empty if absent), when HOST exists."""
    if not os.path.isfile(host):
        return
    try:
        inroot.mkdir_all(merged, os.path.dirname(path))
        fd = inroot.open_in_root(merged, path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        return  # a tree whose /etc/hosts is a directory or a loop: the workload goes without
    os.close(fd)
    _mount(host, inroot.resolve(merged, path), None, MS_BIND)


@dataclass(frozen=True)
class _Start:
    """What the workload's process needs, found in the tree before recording starts (so that our own
    reads of /etc/passwd are not taken for the workload's)."""

    proc: str  # where its /proc goes (a host path inside the tree)
    workdir: str  # inside the tree, absolute
    uid: int
    gid: int
    groups: list[int]


def _start_for(merged: str, workload: Workload) -> _Start:
    try:
        user = resolve_user(merged, workload.user)
    except ValueError as e:
        raise WorkloadError(f"LAZYBUILD_OPTIMIZE: USER {workload.user}: {e}") from None
    proc = inroot.mkdir_all(merged, "/proc")
    rel = os.path.relpath(inroot.mkdir_all(merged, workload.workdir), merged)
    return _Start(proc, "/" if rel == "." else "/" + rel, user.uid, user.gid, list(user.additional_gids))


def _workload_child(merged: str, start: _Start, workload: Workload, err_fd: int) -> None:
    """In the new PID namespace (PID 1): confine, then exec the workload. Never returns. Why it could
    not start goes to ERR_FD (close-on-exec: a successful exec closes it empty)."""
    try:
        _unshare(CLONE_NEWNS)
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        _mount("proc", start.proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this namespace's processes only
        _pivot_root(merged)
        _drop_capabilities()
        os.setgroups(start.groups)
        os.setgid(start.gid)
        os.setuid(start.uid)
        os.chdir(start.workdir)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(2, 1)  # the workload's output goes to the build's log
        env = dict(e.split("=", 1) for e in workload.env)
        os.execvpe(workload.argv[0], list(workload.argv), env)
    except BaseException as e:  # noqa: BLE001 — the child must never return into the exporter
        try:
            os.write(err_fd, f"cannot start the workload {json.dumps(list(workload.argv))}: {e}".encode()[:4096])
        finally:
            os._exit(127)


def _minimal_dev(dev: str) -> None:
    """A tmpfs /dev with the usual nodes only: the export step's own /dev may hold the host's devices."""
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    for name in DEVICES:
        if os.path.exists(os.path.join("/dev", name)):
            open(os.path.join(dev, name), "w").close()
            _mount(os.path.join("/dev", name), os.path.join(dev, name), None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, os.path.join(dev, name))
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(os.path.join(dev, name), 0o755)
    _mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=64m")


def _prepare(state: str, work: str) -> str:
    """The overlay of STATE (lower, untouched) with /dev and the name-service files; returns its root."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks out of this namespace
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMPFS_SIZE},mode=0700")
    upper, wdir, merged = (os.path.join(work, n) for n in ("upper", "work", "merged"))
    for d in (upper, wdir, merged):
        os.mkdir(d, 0o755)
    _mount("overlay", merged, "overlay", 0, f"lowerdir={state},upperdir={upper},workdir={wdir}")
    _minimal_dev(inroot.mkdir_all(merged, "/dev"))
    for name in ("/etc/resolv.conf", "/etc/hosts"):
        _bind_file(name, merged, name)
    return merged


def _read_events(fan: int, merged: str, recording: Recording, ours: int) -> None:
    while True:
        try:
            buf = os.read(fan, 64 * 1024)
        except BlockingIOError:
            return
        if not buf:
            return
        for ev in parse_events(buf):
            if ev.fd == FAN_NOFD:
                continue  # FAN_Q_OVERFLOW: events were lost; the ones read stay in order
            try:
                if ev.pid != ours and ev.mask & FAN_OPEN:
                    st = os.fstat(ev.fd)
                    if (st.st_mode & 0o170000) == 0o100000:
                        path = tree_path(os.readlink(f"/proc/self/fd/{ev.fd}"), merged)
                        if path is not None:
                            recording.add(path)
            except OSError:
                pass
            finally:
                os.close(ev.fd)


def _recorder(state: str, workload: Workload, out_fd: int) -> None:
    """The forked recorder: prepare, run, record, report on OUT_FD. Never returns."""
    result: dict = {}
    try:
        _unshare(CLONE_NEWNS | CLONE_NEWPID)
        work = tempfile.mkdtemp(prefix="lazybuild-workload-")
        merged = _prepare(state, work)
        start = _start_for(merged, workload)
        fan = fanotify_open(merged)
        recording = Recording()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            os.close(fan)
            os.close(out_fd)
            os.close(err_r)
            _workload_child(merged, start, workload, err_w)
        os.close(err_w)
        with os.fdopen(err_r, "rb") as f:
            failed = f.read(4096)  # empty once the exec succeeded
        if failed:
            os.waitpid(child, 0)
            raise WorkloadError("LAZYBUILD_OPTIMIZE: " + failed.decode(errors="replace"))
        ours = os.getpid()
        deadline = time.monotonic() + workload.period_s
        status = None
        while status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(child, signal.SIGKILL)  # PID 1 of the namespace: every process in it goes too
                os.waitpid(child, 0)
                result["killed"] = True
                break
            select.select([fan], [], [], min(remaining, 0.1))
            _read_events(fan, merged, recording, ours)
            pid, st = os.waitpid(child, os.WNOHANG)
            if pid:
                status = st
        _read_events(fan, merged, recording, ours)  # what came in before the workload ended
        os.close(fan)
        if status is not None:
            result["exit"] = os.waitstatus_to_exitcode(status)
        result["paths"] = recording.paths
        _umount(merged)
        _umount(work)
    except BaseException as e:  # noqa: BLE001 — reported to the exporter, never raised past the fork
        result["error"] = str(e) if isinstance(e, WorkloadError) else f"{type(e).__name__}: {e}"
        result["ours"] = isinstance(e, WorkloadError)  # already says what went wrong
        result["errno"] = getattr(e, "errno", None)
    try:
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(out_fd, data):]
    finally:
        os._exit(0)


def record(state: str, workload: Workload, log=lambda s: None) -> list[str]:
    """Run WORKLOAD on the tree STATE (left untouched) for at most its period; the regular files it
    opened, as paths inside the tree without a leading `/`, in first-open order."""
    log(f"optimize: running {json.dumps(list(workload.argv))} for at most {workload.period_s:g} s")
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _recorder(state, workload, w)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        result = json.loads(data) if data else {"error": "the recorder died"}
    except ValueError:
        result = {"error": "the recorder's answer is not JSON"}
    if "error" in result:
        if result.get("ours"):
            raise WorkloadError(result["error"])
        if result.get("errno") in (errno.EPERM, errno.EACCES):
            raise WorkloadError(
                f"LAZYBUILD_OPTIMIZE: the export step may not record the workload ({result['error']})",
                hint="it needs the security.insecure entitlement (CAP_SYS_ADMIN for fanotify and mounts): allow it "
                     "on the daemon and in the build")
        raise WorkloadError(f"LAZYBUILD_OPTIMIZE: recording the workload failed: {result['error']}")
    if result.get("killed"):
        log("optimize: the period ended; the workload was stopped")
    elif result.get("exit"):
        log(f"optimize: the workload exited with code {result['exit']}")  # what it read before still counts
    paths = [p for p in result.get("paths") or [] if isinstance(p, str)][:MAX_PATHS]
    log(f"optimize: {len(paths)} files opened")
    return paths
