"""overlayfs mounts for build steps: lower dirs (top first), an optional upper + work dir."""

from __future__ import annotations

import subprocess

from ..errors import HostError


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
    p = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, target], capture_output=True, text=True)
    if p.returncode != 0:
        raise OverlayError(f"cannot mount overlay at {target}: {p.stderr.strip()}")


def unmount(target: str) -> None:
    p = subprocess.run(["umount", target], capture_output=True, text=True)
    if p.returncode != 0:
        p2 = subprocess.run(["umount", "-l", target], capture_output=True, text=True)
        if p2.returncode != 0:
            raise OverlayError(f"cannot unmount {target}: {p.stderr.strip()}")
