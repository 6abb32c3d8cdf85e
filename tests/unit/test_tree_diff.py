"""The export step's layer from two trees: walking both whole, or only what the step's DiffOp holds (BuildKit
>= v0.10 mounts it for us) must give the same layer tar, deletions included."""

from __future__ import annotations

import os
import shutil
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazybuild.exporter.tree_diff import TreeDiff

NAMES = st.sampled_from(["a", "b", "c", "d"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: "/".join(parts))
# Every tree starts with nested directories and files, so a step's changes land at every depth.
START = [("mkdir", p) for p in ("a", "b", "c", "a/b", "a/c", "b/a", "a/b/c", "a/b/d")] + \
        [("write", p) for p in ("d", "a/a", "a/d", "b/b", "a/b/a", "a/b/c/a", "a/b/c/b", "b/a/a")]
CHANGES = st.lists(st.tuples(st.sampled_from(["write", "mkdir", "delete", "chmod"]), PATHS), min_size=1, max_size=8)


def _entries(path: str) -> list[tuple[str, int, int, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, m.type[0], m.mode, tf.extractfile(m).read() if m.isfile() else b"") for m in tf.getmembers()]


def _apply(root: str, changes) -> set[str]:
    """Make CHANGES in ROOT; returns what a mounted DiffOp would show: what changed, and the directories
    holding a change or a deletion."""
    shown: set[str] = set()

    def parents(rel: str) -> None:
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            shown.add(rel)

    for n, (kind, rel) in enumerate(changes):
        p = os.path.join(root, rel)
        parent = os.path.dirname(p)
        if kind == "delete":
            if os.path.lexists(p):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
                parents(rel)
                shown.discard(rel)
                shown -= {s for s in shown if s.startswith(rel + "/")}
            continue
        if not os.path.isdir(parent) or (os.path.lexists(p) and kind != "chmod" and os.path.isdir(p) != (kind == "mkdir")):
            continue  # a change this tree cannot take as it is: skipped, like a failing command
        if kind == "write":
            with open(p, "w") as f:
                f.write(f"content {n}\n")
        elif kind == "mkdir":
            os.makedirs(p, exist_ok=True)
        elif os.path.lexists(p):
            os.chmod(p, 0o700 if os.stat(p).st_mode & 0o777 != 0o700 else 0o755)
        else:
            continue
        shown.add(rel)
        parents(rel)
    return shown


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(CHANGES, CHANGES)
def test_a_walk_guided_by_the_diff_writes_the_same_layer(tmp_path_factory, before, step):
    work = str(tmp_path_factory.mktemp("tree"))
    lower, upper, changed = (os.path.join(work, n) for n in ("lower", "upper", "changed"))
    os.makedirs(lower)
    _apply(lower, START + before)
    shutil.copytree(lower, upper, symlinks=True, copy_function=shutil.copy2)
    shown = _apply(upper, step)
    # The mounted diff: the changed entries and their directories (contents do not matter to the walk).
    os.makedirs(changed)
    for rel in sorted(shown, key=lambda r: r.count("/")):
        src = os.path.join(upper, rel)
        if os.path.isdir(src):
            os.makedirs(os.path.join(changed, rel), exist_ok=True)
        elif os.path.lexists(src):
            os.makedirs(os.path.dirname(os.path.join(changed, rel)), exist_ok=True)
            open(os.path.join(changed, rel), "w").close()
    whole, guided = os.path.join(work, "whole.tar"), os.path.join(work, "guided.tar")
    TreeDiff(lower, upper).write_tar(whole, source_date_epoch=0)
    TreeDiff(lower, upper, changed).write_tar(guided, source_date_epoch=0)
    assert _entries(guided) == _entries(whole)


def test_an_empty_diff_is_an_empty_layer(tmp_path):
    for d in ("lower/x", "upper/x", "changed"):
        os.makedirs(tmp_path / d)
    (tmp_path / "lower/x/f").write_text("1")
    shutil.copy2(tmp_path / "lower/x/f", tmp_path / "upper/x/f")
    out = str(tmp_path / "l.tar")
    assert TreeDiff(str(tmp_path / "lower"), str(tmp_path / "upper"), str(tmp_path / "changed")).write_tar(out) == 0
