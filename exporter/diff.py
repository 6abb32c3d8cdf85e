"""An overlayfs upper directory -> an OCI layer tar.

overlayfs records a deletion as a 0:0 character device and a replaced directory as the xattr
`trusted.overlay.opaque=y`; OCI layers say the same with `.wh.NAME` and `.wh..wh..opq` entries.
Hardlinks inside the layer stay hardlinks, owners/modes/xattrs are kept (overlay's own trusted.overlay.*
are not), and with SOURCE_DATE_EPOCH every time is clamped to it, for reproducible layers.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _xattrs(path: str) -> dict[str, str]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if name.startswith("trusted.overlay."):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        # PAX records carry text; binary values go through latin-1 byte for byte (tarfile encodes back).
        out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


class LayerTar:
    """A layer tar being written: entries from files as they are on disk (a second name of a file
    already written becomes a hardlink), whiteouts; every time clamped to SOURCE_DATE_EPOCH if given."""

    def __init__(self, tf: tarfile.TarFile, source_date_epoch: int | None = None):
        self.tf, self.epoch = tf, source_date_epoch
        self.links: dict[tuple[int, int], str] = {}
        self.count = 0

    def clamp(self, t: float) -> float:
        return min(t, self.epoch) if self.epoch is not None else t

    def whiteout(self, name: str, mtime: float) -> None:
        ti = tarfile.TarInfo(name)
        ti.mtime = self.clamp(mtime)
        self.tf.addfile(ti)
        self.count += 1

    def add(self, path: str, arc: str, st: os.stat_result) -> None:
        ti = tarfile.TarInfo(arc)
        ti.mode, ti.uid, ti.gid, ti.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, self.clamp(st.st_mtime)
        ti.uname = ti.gname = ""
        ti.pax_headers = _xattrs(path)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in self.links:
            ti.type, ti.linkname = tarfile.LNKTYPE, self.links[key]
            self.tf.addfile(ti)
        elif stat.S_ISREG(st.st_mode):
            ti.size = st.st_size
            if st.st_nlink > 1:
                self.links[key] = arc
            with open(path, "rb") as f:
                self.tf.addfile(ti, f)
        elif stat.S_ISDIR(st.st_mode):
            ti.type = tarfile.DIRTYPE
            self.tf.addfile(ti)
        elif stat.S_ISLNK(st.st_mode):
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
            self.tf.addfile(ti)
        elif stat.S_ISFIFO(st.st_mode):
            ti.type = tarfile.FIFOTYPE
            self.tf.addfile(ti)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tf.addfile(ti)
        else:  # sockets have no tar form; BuildKit drops them too
            return
        self.count += 1


def write_layer(upper: str, out_path: str, source_date_epoch: int | None = None) -> int:
    """Write UPPER as a layer tar at OUT_PATH (temp name + rename). Returns the number of entries."""
    tmp = out_path + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        layer = LayerTar(tf, source_date_epoch)

        def walk(rel: str) -> None:
            base = os.path.join(upper, rel) if rel else upper
            for name in sorted(os.listdir(base)):
                path = os.path.join(base, name)
                arc = f"{rel}/{name}" if rel else name
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    layer.whiteout(f"{rel}/{WHITEOUT}{name}" if rel else WHITEOUT + name, st.st_mtime)
                    continue
                layer.add(path, arc, st)
                if stat.S_ISDIR(st.st_mode):
                    if _is_opaque(path):
                        layer.whiteout(f"{arc}/{OPAQUE}", st.st_mtime)
                    walk(arc)

        walk("")
    os.replace(tmp, out_path)
    return layer.count


@dataclass(frozen=True)
class UpperDirDiff:
    """A step's change as overlayfs recorded it: its upper directory (the daemonless builder's layers)."""

    upper: str

    def write_tar(self, out_path: str, source_date_epoch: int | None = None) -> int:
        return write_layer(self.upper, out_path, source_date_epoch)
