"""Unpack a whole layer into a directory, never writing outside it and never writing unverified bytes.

Entry names are already cleaned and `..`-checked by the reader; here every parent directory is
created by us and checked with lstat, so a symlink in the layer can never redirect a later entry
out of the destination. Regular files are written under a temporary name and renamed when their
content has verified.
"""

from __future__ import annotations

import os
import stat

from .errors import UnsafeEntryError
from .reader import LayerReader, Node
from .toc import parse_modtime


class _Dest:
    def __init__(self, root: str, layer: str):
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.layer = layer
        self.is_root = os.geteuid() == 0
        self.warnings: list[str] = []

    def parent_of(self, rel: str) -> str:
        """The real directory that will hold `rel`, made as needed; refuses to pass through a symlink."""
        cur = self.root
        for part in rel.split("/")[:-1]:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeEntryError(f"{self.layer}: entry {rel!r} would be written through the symlink {cur!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeEntryError(f"{self.layer}: entry {rel!r} has a non-directory parent {cur!r}")
        return cur

    def clear(self, path: str, keep_dir: bool) -> None:
        """Make room for a new entry at `path` (a later layer entry replaces an earlier one, as tar does)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            import shutil

            shutil.rmtree(path)
        else:
            os.unlink(path)

    def set_metadata(self, path: str, node: Node) -> None:
        e = node.entry
        is_link = e.type == "symlink"
        if self.is_root:
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, e.mode & 0o7777)  # after chown, which clears set-id bits
        for key, value in e.xattrs.items():
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as err:
                self.warnings.append(f"{node.path}: xattr {key} not set: {err.strerror}")
        mtime = parse_modtime(e.modtime)
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def extract(reader: LayerReader, dest: str) -> list[str]:
    """Write every entry of the layer under `dest`. Returns warnings (xattrs or devices that could not be made)."""
    d = _Dest(dest, reader.name)
    nodes = sorted((n for n in reader.nodes.values() if n.path), key=lambda n: n.path.split("/"))
    links = [n for n in nodes if n.entry.path != n.path]  # hardlinks share their target's entry
    link_ids = {id(n) for n in links}
    dirs = [n for n in nodes if n.entry.type == "dir"]

    for node in nodes:
        if id(node) in link_ids:
            continue
        e = node.entry
        parent = d.parent_of(node.path)
        path = os.path.join(parent, os.path.basename(node.path))
        d.clear(path, keep_dir=e.type == "dir")
        if e.type == "dir":
            os.makedirs(path, 0o755, exist_ok=True)
            continue
        if e.type == "reg":
            tmp = os.path.join(parent, f".lazybuild-extract-{os.getpid()}-{os.path.basename(node.path)[:100]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    for data in reader.iter_file(node.path):
                        f.write(data)
                os.rename(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        elif e.type == "symlink":
            os.symlink(e.link_name, path)
        elif e.type == "fifo":
            os.mkfifo(path, 0o600)
        elif e.type in ("char", "block"):
            kind = stat.S_IFCHR if e.type == "char" else stat.S_IFBLK
            try:
                os.mknod(path, kind | 0o600, os.makedev(e.dev_major, e.dev_minor))
            except PermissionError:
                d.warnings.append(f"{node.path}: {e.type} device {e.dev_major}:{e.dev_minor} needs root; skipped")
                continue
        d.set_metadata(path, node)

    for node in links:
        parent = d.parent_of(node.path)
        path = os.path.join(parent, os.path.basename(node.path))
        target = os.path.join(d.parent_of(node.entry.path), os.path.basename(node.entry.path))
        d.clear(path, keep_dir=False)
        if os.path.lexists(target):
            os.link(target, path, follow_symlinks=False)
        else:
            d.warnings.append(f"{node.path}: hardlink target {node.entry.path!r} was not extracted; skipped")

    for node in reversed(dirs):  # children first, so writing them does not bump the parent's mtime again
        d.set_metadata(os.path.join(d.root, node.path), node)
    root = reader.nodes[""]
    if root.entry.name:  # the tar had its own "./" entry
        d.set_metadata(d.root, root)
    return d.warnings
