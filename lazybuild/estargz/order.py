"""Entry order of an eStargz layer: duplicates, landmarks and prioritized files.

Mirrors `estargz/build.go sortEntries`/`moveRec` (reference/estargz.md §1.6-1.7) so that the same
prioritized list gives the same file order as stargz-snapshotter.
"""

from __future__ import annotations

import posixpath
import tarfile

from .errors import PrioritizedFileNotFound
from .tarinput import TarHeader, TarMember
from .toc import LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, clean_name


def landmark(name: str) -> TarMember:
    """A landmark entry: tar.Header{Typeflag: '0', Name: name, Size: 1}, so mode, owner and mtime are 0."""
    return TarMember(TarHeader(name, tarfile.REGTYPE, 0, len(LANDMARK_CONTENTS)), -1)


def index_members(members: list[TarMember]) -> dict[str, TarMember]:
    """Clean name -> member in stream order; a later duplicate replaces (and moves after) an earlier one.

    Existing landmarks and TOC entries are dropped: a layer may be stargzified twice.
    """
    index: dict[str, TarMember] = {}
    for m in members:
        key = clean_name(m.info.name)
        if key in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME):
            continue
        index.pop(key, None)
        index[key] = m
    return index


def sort_members(
    members: list[TarMember], prioritized: list[str] = (), allow_not_found: bool = False
) -> tuple[list[TarMember], list[str]]:
    """(members in layer order with the landmark in place, prioritized paths that were not found)."""
    rest = index_members(members)
    if not prioritized:
        return [landmark(NO_PREFETCH_LANDMARK), *rest.values()], []

    moved: dict[str, TarMember] = {}
    missed: list[str] = []

    def move(name: str) -> None:
        name = clean_name(name)
        if name == "":
            # The root entry ("./", "/") exists in some tars: it moves too, and recursion stops.
            if "" in rest:
                moved[""] = rest.pop("")
            return
        if name not in rest and name not in moved:
            raise KeyError(name)
        # Parents first, all the way up. A parent without its own entry makes the whole path
        # "not found", exactly as in the reference (moveRec fails before moving anything).
        move(posixpath.dirname(name))
        m = rest.get(name)
        if m is not None and m.info.islnk():
            move(m.info.linkname)  # a hardlink's target must come before the link
        m = rest.pop(name, None)
        if m is not None:
            moved[name] = m

    for path in prioritized:
        try:
            move(path)
        except KeyError as e:
            if not allow_not_found:
                raise PrioritizedFileNotFound(f"prioritized file {path!r} is not in the layer (missing: {e.args[0]!r})") from None
            missed.append(path)
    return [*moved.values(), landmark(PREFETCH_LANDMARK), *rest.values()], missed
