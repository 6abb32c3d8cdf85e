"""Input tars as real tools write them, one builder per case. Each returns the path of the tar it wrote.

CHUNK is the small chunk size the interop tests use so that chunking, exact multiples and last-chunk
quirks show up in small files.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

CHUNK = 4096


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = attrs.pop("mtime", 1600000000)
    info.uname, info.gname = attrs.pop("uname", "root"), attrs.pop("gname", "root")
    for k, v in attrs.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic bytes that compress a little, like real files."""
    out = bytearray()
    x = seed
    while len(out) < n:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += (b"%08x lazybuild " % x) * 3
    return bytes(out[:n])


def ustar_all_types(path: str, fmt=tarfile.USTAR_FORMAT) -> str:
    """Every entry type, whiteouts, empty files, files at and around chunk multiples, a `./` root entry."""
    with tarfile.open(path, "w", format=fmt) as tf:
        _add(tf, "./", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "./etc/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "./etc/hello.txt", b"hello world\n", mode=0o644)
        _add(tf, "./etc/empty", b"", mode=0o600, uid=1000, gid=1000, uname="user", gname="users")
        _add(tf, "./etc/hl", type=tarfile.LNKTYPE, linkname="./etc/hello.txt", mode=0o644)
        _add(tf, "./etc/sl", type=tarfile.SYMTYPE, linkname="hello.txt", mode=0o777)
        _add(tf, "./etc/abs", type=tarfile.SYMTYPE, linkname="/etc/hello.txt", mode=0o777)
        _add(tf, "./dev/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "./dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tf, "./dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6, gname="disk")
        _add(tf, "./dev/fifo", type=tarfile.FIFOTYPE, mode=0o644)
        _add(tf, "./bin/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "./bin/suid", _pattern(300), mode=0o4755)
        _add(tf, "./tmp/", type=tarfile.DIRTYPE, mode=0o1777)
        _add(tf, "./data/", type=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000, uname="user", gname="users")
        for n in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17):
            _add(tf, f"./data/f{n}", _pattern(n, n), mode=0o644, uid=1000, gid=1000, uname="user", gname="users")
        _add(tf, "./data/.wh.deleted", b"", mode=0o644)
        _add(tf, "./opaque/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "./opaque/.wh..wh..opq", b"", mode=0o644)
        _add(tf, "./zero-mtime", b"x", mode=0o644, mtime=0)
    return path


def gnu_long_names(path: str) -> str:
    """GNU headers: ././@LongLink names and link targets, non-ASCII names, no root entry, no `./`."""
    deep = "/".join(["d" * 40] * 4)  # 163 chars of directories
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tf:
        parts = deep.split("/")
        for i in range(1, len(parts) + 1):
            _add(tf, "/".join(parts[:i]) + "/", type=tarfile.DIRTYPE, mode=0o755)
        long_file = deep + "/" + "f" * 120 + ".txt"
        _add(tf, long_file, _pattern(5000, 7), mode=0o644)
        _add(tf, deep + "/link-to-long", type=tarfile.SYMTYPE, linkname="f" * 120 + ".txt", mode=0o777)
        _add(tf, "hard-" + "h" * 110, type=tarfile.LNKTYPE, linkname=long_file, mode=0o644)
        _add(tf, "ünïcødé/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "ünïcødé/日本語.txt", "こんにちは\n".encode(), mode=0o644)
        _add(tf, "ünïcødé/a<b>&c.txt", b"html escapes in the TOC\n", mode=0o644)
    return path


def pax_xattrs(path: str) -> str:
    """PAX headers: xattrs (text and binary), sub-second mtimes, big uids, long names."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        _add(tf, "usr/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "usr/bin/", type=tarfile.DIRTYPE, mode=0o755)
        info = tarfile.TarInfo("usr/bin/ping")
        data = _pattern(9000, 3)
        info.size, info.mode, info.mtime = len(data), 0o755, 1600000000.6
        info.pax_headers = {
            "SCHILY.xattr.user.comment": "a text xattr",
            "SCHILY.xattr.user.binary": b"\xff\x00\xfe\x80".decode("utf-8", "surrogateescape"),
        }
        tf.addfile(info, io.BytesIO(data))
        _add(tf, "usr/bin/biguid", b"owned by a big uid\n", mode=0o644, uid=3000000, gid=3000000, uname="big", gname="big")
        _add(tf, "usr/share/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "usr/share/" + "p" * 200, b"long pax name\n", mode=0o644)
        _add(tf, "usr/share/dir-with-xattr/", type=tarfile.DIRTYPE, mode=0o755,
             pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"})
    return path


def many_small_files(path: str, count: int = 5200) -> str:
    """5,000+ small files in a few hundred directories, as a package manager leaves them."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "many/", type=tarfile.DIRTYPE, mode=0o755)
        for d in range(count // 20):
            _add(tf, f"many/{d:03d}/", type=tarfile.DIRTYPE, mode=0o755)
        for i in range(count):
            _add(tf, f"many/{i // 20:03d}/file{i:05d}.py", _pattern(50 + i % 700, i), mode=0o644)
    return path


def duplicates_and_landmarks(path: str) -> str:
    """A layer stargzified before: old landmark and TOC entries, and a file written twice (last wins)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, ".prefetch.landmark", b"\x0f", mode=0)
        _add(tf, "a/", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/dup", b"first version\n", mode=0o644)
        _add(tf, "a/other", b"other\n", mode=0o644)
        _add(tf, "a/dup", b"second version, longer\n", mode=0o600)
        _add(tf, "stargz.index.json", b'{"version":1,"entries":[]}', mode=0o644)
    return path


def gnu_tar_real_tree(path: str, workdir: str) -> str:
    """A tar written by GNU tar itself (`--format=posix --xattrs`) from a real directory tree."""
    root = os.path.join(workdir, "tree")
    os.makedirs(os.path.join(root, "lib/sub"), exist_ok=True)
    with open(os.path.join(root, "lib/big.so"), "wb") as f:
        f.write(_pattern(5 * CHUNK + 123, 11))
    with open(os.path.join(root, "lib/sub/small.txt"), "wb") as f:
        f.write(b"small\n")
    open(os.path.join(root, "lib/empty"), "wb").close()
    os.link(os.path.join(root, "lib/big.so"), os.path.join(root, "lib/big.so.1"))
    os.symlink("big.so", os.path.join(root, "lib/big.so.0"))
    os.mkfifo(os.path.join(root, "lib/pipe"))
    try:
        os.setxattr(os.path.join(root, "lib/sub/small.txt"), "user.origin", b"gnu tar")
    except OSError:
        pass  # a filesystem without user xattrs: the PAX case above covers them
    subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name",
         "-C", root, "-cf", path, "."],
        check=True,
    )
    return path


CASES = {
    "ustar": lambda p, w: ustar_all_types(p),
    "gnu": lambda p, w: gnu_long_names(p),
    "pax": lambda p, w: pax_xattrs(p),
    "many": lambda p, w: many_small_files(p),
    "dups": lambda p, w: duplicates_and_landmarks(p),
    "gnutar": lambda p, w: gnu_tar_real_tree(p, w),
}

# Prioritized lists per case: parents first, a hardlink (target moves first), a file whose parent has
# no tar entry of its own (the reference reports it missing), a missing file, `/` and `./` spellings.
PRIORITIZED = {
    "ustar": ["etc/hl", "/data/f8192", "./bin/suid", "does/not/exist", "dev/null"],
    "gnu": ["hard-" + "h" * 110, "ünïcødé/日本語.txt"],
    "pax": ["usr/bin/ping", "usr/share/" + "p" * 200],
    "many": ["many/100/file02010.py", "many/001/file00025.py", "many/000/file00003.py"],
    "dups": ["a/dup"],
    "gnutar": ["lib/big.so.1", "lib/sub/small.txt", "lib/pipe"],
}
