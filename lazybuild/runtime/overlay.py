"""overlayfs mounts for build steps: lower dirs (top first), an optional upper + work dir.

mount(2) and umount2(2) are called directly (through libc): a build mounts and unmounts an overlay per
step, and `mount`/`umount` processes cost a fork and exec each (5-40 ms on a busy machine) for what is
one system call.
"""

from __future__ import annotations

import ctypes
import os

from ..errors import HostError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


class OverlayError(HostError, OSError):
    pass


def mount_overlay(lowers: list[str], upper: str | None, work: str | None, target: str) -> None:
    """Mount an overlay at TARGET. Without UPPER it is read-only and needs two or more lower dirs."""
    opts = "lowerdir=" + ":".join(lowers)
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",index=off"
    if len(opts) > 4000:  # the kernel takes one page of mount options
        raise OverlayError(f"too many layers to stack ({len(lowers)}): the overlay mount options exceed a page")
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, os.fsencode(opts)) != 0:
        err = ctypes.get_errno()
        raise OverlayError(f"cannot mount overlay at {target}: {os.strerror(err)} (lowerdir {lowers[0]}... "
                           f"{len(lowers)} layers)")


def unmount(target: str) -> None:
    """Unmount TARGET; if that fails (busy), detach it: it goes once its last user does."""
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if _libc.umount2(path, MNT_DETACH) == 0:
        return
    raise OverlayError(f"cannot unmount {target}: {os.strerror(err)}")
