"""COPY / ADD into a root filesystem, with BuildKit's file-op semantics: wildcards (a pattern that matches
nothing is fine, a missing plain path is an error), a directory source copies its contents, a file
lands inside the destination when that ends with `/` or is a directory, missing destination parents
are made, `--chown` (names looked up in the destination's /etc/passwd) and `--chmod` apply to all
that is copied, ADD unpacks local archives, and a source that is a symlink is followed."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
import tarfile

from .runc import resolve_user


class CopyError(RuntimeError):
    pass


def has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def match_sources(root: str, pattern: str, ignored=None) -> list[str]:
    """Paths (relative to ROOT) that PATTERN names; wildcards per path element, as Go's filepath.Match."""
    parts = [p for p in posixpath.normpath("/" + pattern).split("/") if p]
    if not parts:
        return [""]
    found = [""]
    for i, part in enumerate(parts):
        nxt = []
        for base in found:
            here = os.path.join(root, base)
            if has_magic(part):
                try:
                    names = sorted(os.listdir(here))
                except OSError:
                    continue
                nxt += [posixpath.join(base, n) for n in names if fnmatch.fnmatchcase(n, part)]
            elif os.path.lexists(os.path.join(here, part)):
                nxt.append(posixpath.join(base, part))
        found = nxt
    if ignored is not None:
        found = [p for p in found if not ignored(p)]
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


def _safe_join(root: str, rel: str) -> str:
    return os.path.join(root, posixpath.normpath("/" + rel).lstrip("/"))


def _makedirs(root: str, rel_dir: str, chown) -> None:
    """Make the destination's missing parents (0755, owned as --chown says, as BuildKit does)."""
    path = root
    for part in [p for p in rel_dir.split("/") if p]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            target = os.path.realpath(path)
            if not target.startswith(os.path.realpath(root)):
                raise CopyError(f"destination {rel_dir!r} leads out of the root through a symlink")
            path = target
        if not os.path.exists(path):
            os.mkdir(path, 0o755)
            if chown is not None:
                os.lchown(path, *chown)


def _copy_tree(src: str, dst: str, chown, chmod, ignored, rel: str) -> None:
    """Copy the contents of directory SRC into directory DST (merged with what is there)."""
    for name in sorted(os.listdir(src)):
        child_rel = posixpath.join(rel, name) if rel else name
        if ignored is not None and ignored(child_rel):
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        _copy_entry(s, d, chown, chmod, ignored, child_rel, follow=False)


def _copy_entry(s: str, d: str, chown, chmod, ignored, rel: str, follow: bool) -> None:
    st = os.stat(s) if follow else os.lstat(s)
    if stat.S_ISDIR(st.st_mode):
        if os.path.lexists(d) and not os.path.isdir(d):
            os.unlink(d)
        if not os.path.isdir(d):
            os.mkdir(d)
        _copy_tree(s, d, chown, chmod, ignored, rel)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        if chown is None:
            os.lchown(d, st.st_uid, st.st_gid)
        _apply(d, chown, chmod)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    if os.path.lexists(d):
        if os.path.isdir(d) and not os.path.islink(d):
            shutil.rmtree(d)
        else:
            os.unlink(d)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(s), d)
        os.lchown(d, *(chown or (st.st_uid, st.st_gid)))
        return
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(s, d, follow_symlinks=True)
        shutil.copystat(s, d, follow_symlinks=True)
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


def _unpack(archive: str, dest_dir: str) -> None:
    """ADD of a local archive: extract it into the destination directory, keeping owners and modes."""
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            name = posixpath.normpath(m.name).lstrip("/")
            if name.startswith(".."):
                raise CopyError(f"{archive}: entry {m.name!r} would leave the destination")
        tf.extractall(dest_dir, numeric_owner=True, filter="fully_trusted")


def copy(dest_root: str, dest: str, sources: list[tuple[str, str]], *, chown: str = "", chmod: str = "",
         unpack: bool = False, ignored=None) -> None:
    """Copy each (source root, path or pattern) to DEST (absolute, trailing `/` = into a directory)
    inside DEST_ROOT. IGNORED(path) hides context paths (.dockerignore)."""
    owner = parse_chown(chown, dest_root)
    mode = int(chmod, 8) if chmod else None
    into_dir = dest.endswith("/")
    matches: list[tuple[str, str]] = []
    for root, pattern in sources:
        found = match_sources(root, pattern, ignored)
        if not found and not has_magic(pattern):
            raise CopyError(f"{pattern}: not found")
        matches += [(root, f) for f in found]
    if len(matches) > 1:
        into_dir = True
    rel_dest = posixpath.normpath(dest).lstrip("/")
    for root, rel in matches:
        src = _safe_join(root, rel)
        st = os.stat(src) if os.path.exists(src) else os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            _makedirs(dest_root, rel_dest, owner)
            target = _safe_join(dest_root, rel_dest)
            _copy_tree(src, target, owner, mode, ignored, rel)
            continue
        if unpack and stat.S_ISREG(st.st_mode) and _is_archive(src):
            _makedirs(dest_root, rel_dest, owner)
            _unpack(src, _safe_join(dest_root, rel_dest))
            continue
        target_rel = rel_dest
        existing = _safe_join(dest_root, rel_dest)
        if into_dir or (os.path.isdir(existing) and rel_dest):
            target_rel = posixpath.join(rel_dest, posixpath.basename(rel))
        _makedirs(dest_root, posixpath.dirname(target_rel), owner)
        _copy_entry(src, _safe_join(dest_root, target_rel), owner, mode, None, rel, follow=True)


def write_file(dest_root: str, dest: str, name: str, data: bytes, *, chown: str = "", chmod: str = "") -> None:
    """A heredoc source: a file NAME with DATA copied to DEST (mode 0664 unless --chmod)."""
    owner = parse_chown(chown, dest_root)
    rel_dest = posixpath.normpath(dest).lstrip("/")
    existing = _safe_join(dest_root, rel_dest)
    target_rel = posixpath.join(rel_dest, name) if dest.endswith("/") or os.path.isdir(existing) else rel_dest
    _makedirs(dest_root, posixpath.dirname(target_rel), owner)
    path = _safe_join(dest_root, target_rel)
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, int(chmod, 8) if chmod else 0o664)
    if owner:
        os.lchown(path, *owner)
