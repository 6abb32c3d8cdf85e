"""The path resolver (lazybuild/inroot.py): nothing it returns or makes is outside its root.

Property tests build random trees of directories, files and symlinks (relative and absolute targets,
`..` chains, loops, links to the canary's absolute path) and random paths through them, and check:
the result is under the root, no existing component of it is a symlink, and for paths that exist
it is exactly where the kernel's own openat2(RESOLVE_IN_ROOT) lands.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazybuild import inroot

NAMES = st.sampled_from(["a", "b", "c", "..", ".", "etc", "x"])
TARGETS = st.lists(NAMES, min_size=0, max_size=5).map("/".join)


@st.composite
def trees(draw):
    """(entries, path): entries are (relative path, kind, link target) made in order."""
    entries = []
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.lists(st.sampled_from(["a", "b", "c"]), max_size=2))
        name = draw(st.sampled_from(["a", "b", "c", "etc", "x", "l1", "l2"]))
        kind = draw(st.sampled_from(["dir", "file", "link"]))
        target = ""
        if kind == "link":
            target = draw(st.one_of(TARGETS, TARGETS.map(lambda t: "/" + t), st.just("@canary")))
        entries.append(("/".join(parent + [name]), kind, target))
    path = draw(st.lists(st.sampled_from(["a", "b", "c", "..", ".", "etc", "x", "l1", "l2"]), max_size=8))
    return entries, "/".join(path)


def _make(root: str, entries, canary_root: str) -> None:
    for rel, kind, target in entries:
        full = os.path.join(root, rel)
        parents = rel.split("/")[:-1]
        if any(os.path.islink(os.path.join(root, *parents[: i + 1])) for i in range(len(parents))):
            continue  # making it would write through a link (to the canary, say)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if kind == "dir":
                os.makedirs(full, exist_ok=True)
            elif kind == "file":
                os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
            else:
                os.symlink(canary_root if target == "@canary" else target, full)
        except OSError:
            pass  # a name already taken by another kind: the tree is what it is


def _no_symlink_components(root: str, full: str, follow_last: bool) -> None:
    rel = os.path.relpath(full, root)
    parts = [] if rel == "." else rel.split("/")
    for i in range(len(parts)):
        p = os.path.join(root, *parts[: i + 1])
        if os.path.islink(p):
            assert i == len(parts) - 1 and not follow_last, f"{p} is a symlink inside the result"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees(), st.booleans())
def test_resolve_stays_inside_and_matches_the_kernel(canary, tree, follow_last):
    entries, path = tree
    root = tempfile.mkdtemp(prefix="inroot-")
    try:
        _make(root, entries, canary.root)
        try:
            full = inroot.resolve(root, path, follow_last=follow_last)
        except inroot.UnsafePath as e:
            assert e.errno == errno.ELOOP
            return
        assert os.path.commonpath([root, full]) == root
        _no_symlink_components(root, full, follow_last)
        if follow_last and inroot.have_openat2():
            # Where the kernel finds the path, it must be where we said. (Where a missing component
            # is followed by `..` the kernel fails and we go on lexically, as securejoin does.)
            try:
                fd = inroot.open_in_root(root, path, os.O_PATH)
            except (FileNotFoundError, NotADirectoryError):
                return
            try:
                assert os.readlink(f"/proc/self/fd/{fd}") == full
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(root)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees())
def test_mkdir_all_makes_nothing_outside(canary, tree):
    entries, path = tree
    root = tempfile.mkdtemp(prefix="inroot-")
    try:
        _make(root, entries, canary.root)
        try:
            made = inroot.mkdir_all(root, path)
        except (inroot.UnsafePath, FileExistsError):
            return
        assert os.path.commonpath([root, made]) == root
        assert os.path.isdir(made) and not os.path.islink(made)
    finally:
        shutil.rmtree(root)


def test_absolute_and_dotdot_links_stay_in_the_root(tmp_path, canary):
    root = str(tmp_path)
    os.makedirs(f"{root}/app")
    os.symlink(canary.writable_dir, f"{root}/app/sub")
    os.symlink("../../../../../..", f"{root}/app/up")
    assert inroot.resolve(root, "/app/sub/x") == root + canary.writable_dir + "/x"
    assert inroot.resolve(root, "app/up/etc/shadow") == f"{root}/etc/shadow"
    assert inroot.read_file(root, "app/up/etc/shadow", 1 << 10) is None
    made = inroot.mkdir_all(root, "app/sub/new")
    assert made == root + canary.writable_dir + "/new"
    fd = inroot.open_in_root(root, "app/sub/new/file", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    assert os.path.isfile(root + canary.writable_dir + "/new/file")


def test_loops_and_non_directories_are_errors(tmp_path):
    root = str(tmp_path)
    os.symlink("b", f"{root}/a")
    os.symlink("a", f"{root}/b")
    with pytest.raises(inroot.UnsafePath, match="too many levels"):
        inroot.resolve(root, "a/x")
    with open(f"{root}/file", "w") as f:
        f.write("x")
    with pytest.raises(inroot.UnsafePath, match="/file is not a directory"):
        inroot.mkdir_all(root, "file/sub")


def test_read_file_is_bounded(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with pytest.raises(inroot.UnsafePath, match="larger than 1000 bytes"):
        inroot.read_file(str(tmp_path), "big", 1000)
    assert inroot.read_file(str(tmp_path), "big", 5000) == b"x" * 2000
