"""The change between two root filesystems (a step's state before and after) as an OCI layer tar.

Inside a BuildKit build the exporter sees each step's state as a read-only mount, not an overlay upper
dir, so the layer is found by walking both trees: a path that is new or whose metadata or content
changed is written; a path that is gone becomes a `.wh.` whiteout. Unchanged files are recognised by
type, mode, owner, size, mtime and link target (BuildKit keeps them on their snapshot untouched), with
the content compared only when those agree but the file is small enough to be cheap to check.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass

from .diff import WHITEOUT, LayerTar, _xattrs

CONTENT_CHECK_MAX = 1 << 20


def _same(a: os.stat_result, b: os.stat_result, pa: str, pb: str) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode) or a.st_mode != b.st_mode:
        return False
    if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if stat.S_ISDIR(a.st_mode):
        return a.st_mtime_ns == b.st_mtime_ns and _xattrs(pa) == _xattrs(pb)
    if stat.S_ISREG(a.st_mode):
        if a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns:
            return False
        if a.st_size <= CONTENT_CHECK_MAX:
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                if fa.read() != fb.read():
                    return False
        return _xattrs(pa) == _xattrs(pb)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    return True


def write_diff(lower: str | None, upper: str, out_path: str, source_date_epoch: int | None = None,
               changed: str | None = None) -> int:
    """Write the change from LOWER (None: empty) to UPPER as a layer tar; returns its entry count.
    CHANGED, if given, is the step's mounted DiffOp: only the directories it holds are compared."""
    tmp = out_path + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        layer = LayerTar(tf, source_date_epoch)

        def walk(rel: str) -> None:
            up_dir = os.path.join(upper, rel)
            low_dir = os.path.join(lower, rel) if lower is not None else None
            new_names = sorted(os.listdir(up_dir))
            old_names = set(os.listdir(low_dir)) if low_dir and os.path.isdir(low_dir) and not os.path.islink(low_dir) else set()
            for name in sorted(old_names - set(new_names)):
                layer.whiteout(f"{rel}/{WHITEOUT}{name}" if rel else WHITEOUT + name, os.lstat(up_dir).st_mtime)
            if changed is not None:
                # Only what the diff holds can have changed; a name it holds that the step deleted (an
                # overlay whiteout, if the daemon shows one) was handled above.
                in_diff = set(os.listdir(os.path.join(changed, rel)))
                new_names = [n for n in new_names if n in in_diff]
            for name in new_names:
                arc = f"{rel}/{name}" if rel else name
                pu = os.path.join(up_dir, name)
                su = os.lstat(pu)
                pl = os.path.join(low_dir, name) if name in old_names else None
                sl = os.lstat(pl) if pl else None
                if sl is None or not _same(sl, su, pl, pu):
                    layer.add(pu, arc, su)  # new or changed; over a directory of the lower it replaces it whole
                if stat.S_ISDIR(su.st_mode):
                    if sl is not None and stat.S_ISDIR(sl.st_mode):
                        if changed is None or os.path.isdir(os.path.join(changed, arc)):
                            walk(arc)
                    else:
                        walk_new(arc)

        def walk_new(rel: str) -> None:
            for name in sorted(os.listdir(os.path.join(upper, rel))):
                arc = f"{rel}/{name}"
                p = os.path.join(upper, arc)
                st = os.lstat(p)
                layer.add(p, arc, st)
                if stat.S_ISDIR(st.st_mode):
                    walk_new(arc)

        walk("")
    os.replace(tmp, out_path)
    return layer.count


@dataclass(frozen=True)
class TreeDiff:
    """A step's change as two whole trees, before (None: nothing) and after (BuildKit's states)."""

    lower: str | None
    upper: str
    changed: str | None = None  # the step's mounted DiffOp, where the daemon has one

    def write_tar(self, out_path: str, source_date_epoch: int | None = None) -> int:
        return write_diff(self.lower, self.upper, out_path, source_date_epoch, self.changed)
