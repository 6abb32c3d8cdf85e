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


def write_layer(upper: str, out_path: str, source_date_epoch: int | None = None) -> int:
    """Write UPPER as a layer tar at OUT_PATH (temp name + rename). Returns the number of entries."""
    tmp = out_path + ".partial"
    links: dict[tuple[int, int], str] = {}
    count = 0

    def clamp(t: float) -> float:
        return min(t, source_date_epoch) if source_date_epoch is not None else t

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        def add_whiteout(name: str, mtime: float) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime = clamp(mtime)
            tf.addfile(ti)

        def walk(rel: str) -> None:
            nonlocal count
            base = os.path.join(upper, rel) if rel else upper
            for name in sorted(os.listdir(base)):
                path = os.path.join(base, name)
                arc = f"{rel}/{name}" if rel else name
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    add_whiteout(f"{rel}/{WHITEOUT}{name}" if rel else WHITEOUT + name, st.st_mtime)
                    count += 1
                    continue
                ti = tarfile.TarInfo(arc)
                ti.mode = stat.S_IMODE(st.st_mode)
                ti.uid, ti.gid = st.st_uid, st.st_gid
                ti.uname = ti.gname = ""
                ti.mtime = clamp(st.st_mtime)
                ti.pax_headers = _xattrs(path)
                key = (st.st_dev, st.st_ino)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in links:
                    ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
                    tf.addfile(ti)
                elif stat.S_ISREG(st.st_mode):
                    ti.size = st.st_size
                    if st.st_nlink > 1:
                        links[key] = arc
                    with open(path, "rb") as f:
                        tf.addfile(ti, f)
                elif stat.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                    if _is_opaque(path):
                        add_whiteout(f"{arc}/{OPAQUE}", st.st_mtime)
                        count += 1
                    walk(arc)
                elif stat.S_ISLNK(st.st_mode):
                    ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                    tf.addfile(ti)
                elif stat.S_ISFIFO(st.st_mode):
                    ti.type = tarfile.FIFOTYPE
                    tf.addfile(ti)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                    ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                    tf.addfile(ti)
                else:  # sockets have no tar form; BuildKit drops them too
                    continue
                count += 1

        walk("")
    os.replace(tmp, out_path)
    return count
