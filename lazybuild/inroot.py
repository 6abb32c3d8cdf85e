"""Paths from untrusted input, resolved inside their root: the one place that joins them.

A build context, an image's filesystem, a stage or an archive is a tree that a stranger wrote. Its
symlinks are meant for a container where the tree is `/`: `/app/sub -> /etc/cron.d` means the
tree's own etc/cron.d, and `../../..` stops at the tree's top. Joined by hand on the host, the same
names lead out of the tree, so every path derived from such input goes through here, with the same
rules as BuildKit's and containerd's (continuity's fs.RootPath, cyphar/filepath-securejoin):

- `resolve()` walks the path one component at a time from ROOT: `..` never climbs above ROOT, a
  symlink's target is read and walked in its place (absolute targets from ROOT), at most 255 links.
  The result is a host path under ROOT whose existing components are real directories, never
  symlinks, so what follows cannot be led out of the tree by a name.
- `open_in_root()` opens through openat2(2) with RESOLVE_IN_ROOT where the kernel has it (5.6+): the
  kernel itself then resolves every component inside ROOT, with no window between check and use;
  where it does not, the resolved path is opened with O_NOFOLLOW.
- `mkdir_all()` makes missing directories one at a time below a resolved parent, refusing a
  component that is there but not a directory.

Nothing here trusts the tree not to change while it is walked: the builder runs no step while it
copies, and the openat2 path holds even if something did.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat

from .errors import DataError

# Linux's limit on symlinks followed in one lookup (MAXSYMLINKS is 40 per nested lookup, but
# securejoin and the kernel's RESOLVE_IN_ROOT allow this many in all).
MAX_SYMLINKS = 255

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class UnsafePath(DataError, OSError):
    """A path that cannot be resolved inside its root (a symlink loop, a non-directory in the way)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def resolve(root: str, path: str, *, follow_last: bool = True) -> str:
    """The host path that PATH names when ROOT is `/`: every symlink on the way resolved inside ROOT.

    Components that do not exist are taken as written (a later `..` drops them). With follow_last
    false a final symlink is left as it is (lstat semantics), as for a COPY destination entry that
    is replaced rather than written through.
    """
    root = os.path.abspath(root)
    todo = _split(path)
    todo.reverse()  # a stack: the next component is last
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            done.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode) or (not todo and not follow_last):
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise UnsafePath(errno.ELOOP, f"too many levels of symbolic links in {path!r}", root)
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        more = _split(target)
        more.reverse()
        todo.extend(more)
    return os.path.join(root, *done)


def relative(root: str, path: str, *, follow_last: bool = True) -> str:
    """What resolve() gives, relative to ROOT ("" for ROOT itself): the name to check ignore rules on."""
    full = resolve(root, path, follow_last=follow_last)
    rel = os.path.relpath(full, os.path.abspath(root))
    return "" if rel == "." else rel


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup; the kernel asks to retry
            continue
        raise OSError(err, os.strerror(err), path)


def have_openat2() -> bool:
    """Whether this kernel resolves inside a root by itself (checked once)."""
    global _have_openat2
    if _have_openat2 is None:
        try:
            os.close(_openat2(-100, "/", os.O_PATH | os.O_DIRECTORY, 0))  # -100: AT_FDCWD
            _have_openat2 = True
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):  # EPERM: a seccomp filter
                raise
            _have_openat2 = False
    return _have_openat2


def open_in_root(root: str, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A file descriptor for PATH inside ROOT (`/` = ROOT, symlinks resolved inside it)."""
    if have_openat2():
        rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(rootfd, path.lstrip("/") or ".", flags, mode)
        finally:
            os.close(rootfd)
    # No openat2: resolve by walking, then refuse a final symlink that appeared since.
    return os.open(resolve(root, path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def read_file(root: str, path: str, limit_bytes: int) -> bytes | None:
    """The contents of PATH inside ROOT, or None when there is no such file; at most LIMIT_BYTES
    (an image's /etc/passwd is read before anything verified it, so it is read bounded)."""
    try:
        fd = open_in_root(root, path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError, UnsafePath):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise UnsafePath(errno.EFBIG, f"{path} is larger than {limit_bytes} bytes", root)
    return data


def mkdir_all(root: str, path: str, mode: int = 0o755, chown: tuple[int, int] | None = None) -> str:
    """Make PATH inside ROOT with any missing parents; returns its resolved host path.

    PATH is resolved first (a dangling symlink on the way names where the directories go, inside
    ROOT); then each missing component is made with MODE (umask applied, as mkdir does) and CHOWN.
    A component that exists and is not a directory is an error, never replaced.
    """
    root = os.path.abspath(root)
    target = resolve(root, path)
    current = root
    for part in _split(os.path.relpath(target, root)):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, mode)
            if chown is not None:
                os.lchown(current, *chown)
            continue
        if not stat.S_ISDIR(st.st_mode):  # a file, or a symlink put there since resolve()
            rel = posixpath.join("/", os.path.relpath(current, root))
            raise UnsafePath(errno.ENOTDIR, f"{rel} is not a directory", root)
    return current
