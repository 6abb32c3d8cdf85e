"""COPY / ADD into a root filesystem, with BuildKit's file-op semantics: wildcards (a pattern that matches
nothing is fine, a missing plain path is an error), a directory source copies its contents, a file
lands inside the destination when that ends with `/` or is a directory, missing destination parents
are made, `--chown` (names looked up in the destination's /etc/passwd) and `--chmod` apply to all
that is copied, ADD unpacks local archives, and a source that is a symlink is followed.

Both sides are trees a stranger wrote (a context, a stage, an image), so every path is resolved inside
its own root by lazybuild.inroot, as BuildKit's fs.RootPath does: a source symlink is followed within
the source tree, a destination symlink within the image, and `.dockerignore` is applied to the path
really read, so an alias cannot bring an ignored file in. Symlinks inside a copied directory are
copied as symlinks, never followed; an entry in the way is replaced, never written through.
"""

from __future__ import annotations

import fnmatch
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib

from lazybuild import inroot
from lazybuild.errors import BuildFailure

from lazybuild.runtime.runc import resolve_user


class CopyError(BuildFailure):
    pass


def has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _rel(root: str, full: str) -> str:
    rel = os.path.relpath(full, root)
    return "" if rel == "." else rel


def match_sources(root: str, pattern: str, ignored=None) -> list[tuple[str, str]]:
    """(name, host path) for each path inside ROOT that PATTERN names; wildcards per path element, as Go's
    filepath.Match. Symlinks on the way are resolved inside ROOT; IGNORED(path) is asked about the path
    really read (relative to ROOT), so `link -> secret` is as ignored as `secret`."""
    root = os.path.abspath(root)
    parts = [p for p in posixpath.normpath("/" + pattern).split("/") if p]
    found = [("", root)]
    for part in parts:
        nxt = []
        for name, here in found:
            if has_magic(part):
                try:
                    names = sorted(os.listdir(here))
                except OSError:
                    continue
                matched = [n for n in names if fnmatch.fnmatchcase(n, part)]
            else:
                matched = [part]
            for n in matched:
                full = inroot.resolve(root, _rel(root, here) + "/" + n)
                if os.path.lexists(full):
                    nxt.append((posixpath.join(name, n), full))
        found = nxt
    if ignored is not None:
        found = [(name, full) for name, full in found if not (_rel(root, full) and ignored(_rel(root, full)))]
    return found


def parse_chown(spec: str, dest_root: str) -> tuple[int, int] | None:
    if not spec:
        return None
    user, _, group = spec.partition(":")
    if user.isdigit() and (not group or group.isdigit()):
        uid = int(user)
        return uid, int(group) if group else uid
    try:
        u = resolve_user(dest_root, user)
    except ValueError as e:
        raise CopyError(f"--chown={spec}: {e}") from None
    uid, gid = u.uid, u.gid
    if group:
        gid = int(group) if group.isdigit() else resolve_user(dest_root, f"{uid}:{group}").gid
    return uid, gid


def _apply(path: str, chown: tuple[int, int] | None, chmod: int | None) -> None:
    if chown is not None:
        os.lchown(path, *chown)
    if chmod is not None and not os.path.islink(path):
        os.chmod(path, chmod)


def _makedirs(root: str, rel_dir: str, chown) -> str:
    """Make the destination's missing parents inside ROOT (0755, owned as --chown says, as BuildKit
    does); the resolved host path of REL_DIR."""
    try:
        return inroot.mkdir_all(root, rel_dir, 0o755, chown)
    except inroot.UnsafePath as e:
        raise CopyError(f"destination {'/' + rel_dir.lstrip('/')}: {e.strerror}") from None


def _clear(d: str, keep_dir: bool) -> None:
    """Make way at D (a host path whose parent is a real directory): a directory stays when KEEP_DIR,
    anything else in the way (a file, a symlink, a directory a file replaces) is removed, never followed."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(d)
    else:
        os.unlink(d)


def _copy_tree(src: str, dst: str, chown, chmod, ignored, src_root: str) -> None:
    """Copy the contents of directory SRC into directory DST (merged with what is there)."""
    for name in sorted(os.listdir(src)):
        s = os.path.join(src, name)
        if ignored is not None and ignored(_rel(src_root, s)):
            continue
        _copy_entry(s, os.path.join(dst, name), chown, chmod, ignored, src_root)


def _copy_entry(s: str, d: str, chown, chmod, ignored, src_root: str) -> None:
    """Copy S (lstat: a symlink is copied as one) to D, whose parent is a real directory in the image."""
    st = os.lstat(s)
    if stat.S_ISDIR(st.st_mode):
        _clear(d, keep_dir=True)
        if not os.path.lexists(d):
            os.mkdir(d)
        _copy_tree(s, d, chown, chmod, ignored, src_root)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        if chown is None:
            os.lchown(d, st.st_uid, st.st_gid)
        _apply(d, chown, chmod)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    _clear(d, keep_dir=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(s), d)
        os.lchown(d, *(chown or (st.st_uid, st.st_gid)))
        return
    if stat.S_ISREG(st.st_mode):
        with open(s, "rb") as fin:
            fd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # devices, fifos
        os.mknod(d, st.st_mode, st.st_rdev)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(d, stat.S_IMODE(st.st_mode))
    os.lchown(d, *(chown or (st.st_uid, st.st_gid)))
    if chmod is not None:
        os.chmod(d, chmod)


def _is_archive(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


def unpack_archive(archive: str, dest_dir: str, label: str, limit: int, xattrs: tuple[str, ...] = ()) -> None:
    """An archive from elsewhere (a remote build context, an imported cache step) into DEST_DIR, by the
    rules of ADD's extraction below, refusing to write more than LIMIT bytes of file content (a small
    archive may inflate without bound) and setting only the extended attributes named in XATTRS."""
    try:
        with tarfile.open(archive) as tf:
            _unpack_members(tf, dest_dir, "", label, limit, xattrs)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise CopyError(f"{label}: not a readable archive: {e}") from None


def _unpack(archive: str, dest_root: str, rel_dir: str, label: str) -> None:
    """ADD of a local archive: extract it into REL_DIR inside DEST_ROOT, keeping owners and modes.

    Member names are rebased under the destination (`/etc/x` -> `etc/x`) and one that climbs out
    with `..` is refused; a member under a symlink that the archive itself made is refused (the
    symlink-then-file trick), as is a hardlink whose target climbs out. Parents that were already
    in the image are resolved inside it. Every entry is created, never written through.
    """
    try:
        with tarfile.open(archive) as tf:
            _unpack_members(tf, dest_root, rel_dir, label)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise CopyError(f"{label}: not a readable archive: {e}") from None


def _unpack_members(tf: tarfile.TarFile, dest_root: str, rel_dir: str, label: str, limit: int | None = None,
                    xattrs: tuple[str, ...] = ()) -> None:
    made_links: set[str] = set()
    written = 0
    while True:
        m = tf.next()
        if m is None:
            break
        # A negative size (GNU base-256) would send tarfile's next offset backwards, forever.
        if m.size < 0:
            raise CopyError(f"{label}: entry {m.name!r} has a negative size")
        written += m.size if m.isreg() else 0
        if limit is not None and written > limit:
            raise CopyError(f"{label}: unpacks to over {limit >> 20} MiB, the cap")
        name = posixpath.normpath(m.name.lstrip("/"))
        if name == "." or not name:
            continue
        if name == ".." or name.startswith("../"):
            raise CopyError(f"{label}: entry {m.name!r} would leave the destination")
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in made_links:
                raise CopyError(f"{label}: entry {m.name!r} is under a symlink the archive made "
                                f"({'/'.join(parts[:i])})")
        parent = _makedirs(dest_root, posixpath.join(rel_dir, *parts[:-1]), None)
        path = os.path.join(parent, parts[-1])
        _unpack_member(tf, m, path, dest_root, rel_dir, label)
        if xattrs and not m.issym() and not m.islnk():
            for attr in xattrs:
                value = m.pax_headers.get("SCHILY.xattr." + attr)
                if value is not None:
                    try:
                        data = value.encode("latin-1")
                    except UnicodeEncodeError:
                        raise CopyError(f"{label}: entry {m.name!r}: {attr} is not a byte string") from None
                    os.setxattr(path, attr, data, follow_symlinks=False)
        if m.issym():
            made_links.add(name)
        else:
            made_links.discard(name)


def _unpack_member(tf: tarfile.TarFile, m: tarfile.TarInfo, path: str, dest_root: str, rel_dir: str,
                   label: str) -> None:
    _clear(path, keep_dir=m.isdir())
    if m.isdir():
        if not os.path.lexists(path):
            os.mkdir(path, 0o700)
    elif m.issym():
        os.symlink(m.linkname, path)
    elif m.islnk():
        target = posixpath.normpath(m.linkname.lstrip("/"))
        if target == ".." or target.startswith("../"):
            raise CopyError(f"{label}: hardlink {m.name!r} points out of the destination ({m.linkname!r})")
        source = inroot.resolve(dest_root, posixpath.join(rel_dir, target), follow_last=False)
        if not os.path.lexists(source) or os.path.isdir(source) and not os.path.islink(source):
            raise CopyError(f"{label}: hardlink {m.name!r} points to {m.linkname!r}, which is not a file "
                            "in the archive")
        os.link(source, path, follow_symlinks=False)
        return
    elif m.isreg():
        src = tf.extractfile(m)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
    else:
        return  # sockets and unknown types: skipped, as tar does
    os.lchown(path, m.uid, m.gid)
    if not m.issym():
        os.chmod(path, stat.S_IMODE(m.mode))
        os.utime(path, (m.mtime, m.mtime))


def copy(dest_root: str, dest: str, sources: list[tuple[str, str]], *, chown: str = "", chmod: str = "",
         unpack: bool = False, ignored=None) -> None:
    """Copy each (source root, path or pattern) to DEST (absolute, trailing `/` = into a directory)
    inside DEST_ROOT. IGNORED(path) hides context paths (.dockerignore)."""
    owner = parse_chown(chown, dest_root)
    mode = int(chmod, 8) if chmod else None
    into_dir = dest.endswith("/")
    matches: list[tuple[str, str, str]] = []  # (source root, name as matched, host path inside the root)
    for root, pattern in sources:
        found = match_sources(root, pattern, ignored)
        if not found and not has_magic(pattern):
            raise CopyError(f"{pattern}: not found")
        matches += [(os.path.abspath(root), name, full) for name, full in found]
    if len(matches) > 1:
        into_dir = True
    rel_dest = posixpath.normpath(dest).lstrip("/")
    for root, name, src in matches:
        try:
            st = os.lstat(src)  # resolved: a symlink here is one that could not be followed (dangling)
        except FileNotFoundError:
            raise CopyError(f"{name}: not found") from None
        if stat.S_ISDIR(st.st_mode):
            target = _makedirs(dest_root, rel_dest, owner)
            _copy_tree(src, target, owner, mode, ignored, root)
            continue
        if unpack and stat.S_ISREG(st.st_mode) and _is_archive(src):
            _makedirs(dest_root, rel_dest, owner)
            _unpack(src, dest_root, rel_dest, name)
            continue
        existing = inroot.resolve(dest_root, rel_dest)
        if into_dir or (rel_dest and os.path.isdir(existing)):
            parent = _makedirs(dest_root, rel_dest, owner)
            target = os.path.join(parent, posixpath.basename(name) or posixpath.basename(src))
        else:
            target = existing
            parent = _makedirs(dest_root, _rel(os.path.abspath(dest_root), os.path.dirname(target)), owner)
        _copy_entry(src, target, owner, mode, None, root)


def write_file(dest_root: str, dest: str, name: str, data: bytes, *, chown: str = "", chmod: str = "") -> None:
    """A heredoc source: a file NAME with DATA copied to DEST (mode 0664 unless --chmod)."""
    owner = parse_chown(chown, dest_root)
    if "/" in name or name in ("", ".", ".."):
        raise CopyError(f"heredoc name {name!r} is not a file name")
    rel_dest = posixpath.normpath(dest).lstrip("/")
    existing = inroot.resolve(dest_root, rel_dest)
    if dest.endswith("/") or os.path.isdir(existing):
        path = os.path.join(_makedirs(dest_root, rel_dest, owner), name)
    else:
        _makedirs(dest_root, _rel(os.path.abspath(dest_root), os.path.dirname(existing)), owner)
        path = existing
    _clear(path, keep_dir=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, int(chmod, 8) if chmod else 0o664)
    if owner:
        os.lchown(path, *owner)
