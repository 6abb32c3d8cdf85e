"""`--output type=tar|local`: the final filesystem of a build, as a tar or a directory.

It is read from a merged view of every layer, so each base file is read, hence fetched: this output is
the whole image, not lazy."""

from __future__ import annotations

import os
import subprocess

from .assemble import ExportError, Log


def write_rootfs(view_dir: str, dest: str, as_tar: bool, log: Log = lambda s: None) -> None:
    """Copy the tree at VIEW_DIR (owners, modes, xattrs and numeric ids kept) into a tar or a directory at DEST.
    The tar is written under a temporary name and renamed when complete."""
    if as_tar:
        tmp = dest + ".partial"
        p = subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", view_dir, "-cf", tmp, "."],
                           capture_output=True, text=True)
        if p.returncode != 0:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise ExportError(f"writing {dest}: {p.stderr.strip()}")
        os.replace(tmp, dest)
    else:
        os.makedirs(dest, exist_ok=True)
        p = subprocess.run(["cp", "-a", view_dir + "/.", dest], capture_output=True, text=True)
        if p.returncode != 0:
            raise ExportError(f"writing {dest}: {p.stderr.strip()}")
    log(f"wrote the root filesystem to {dest}")
