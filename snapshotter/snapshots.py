"""The snapshotter's semantics: containerd's overlayfs snapshotter (upper/work dirs under ROOT/snapshots,
overlay mounts over the parents) plus remote snapshots, whose layer is a directory of our FUSE mount.

Remote-snapshot protocol (containerd's unpacker + metadata store): a layer's Prepare carries
`containerd.io/snapshot.ref` = its chain ID and the image labels. If the layer can be served lazily we
commit it at once under that name and answer AlreadyExists; containerd then finds it with List
(`labels."containerd.io/snapshot.ref"==ID,parent==P`) and never downloads the layer. If it cannot (not
eStargz, no TOC digest, registry refusing), Prepare is an ordinary active snapshot and containerd
downloads and unpacks the layer into it, then commits it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .remote import (FALLBACK_ERRORS, REF_LABEL, REMOTE_LABEL, LabelError, LayerSource, LazyLayers, check_labels,
                     set_labels)
from .store import ACTIVE, COMMITTED, VIEW, Snapshot, SnapshotError, Store

log = logging.getLogger("lazybuild.snapshotter")


@dataclass
class Mount:
    type: str
    source: str
    options: list[str]


class KeyedLocks:
    """One lock per key, made on first use and dropped when nobody holds or waits for it: concurrent
    requests for the same layer queue behind each other, requests for different layers do not."""

    def __init__(self):
        self._lock = threading.Lock()
        self._locks: dict[object, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key):
        with self._lock:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class Snapshotter:
    def __init__(self, root: str, lazy: LazyLayers | None, mounted: threading.Event | None = None):
        """`mounted`: set once the FUSE mount of the lazy layers is up (None: it is); until then the
        requests that hand out a lazy layer's directory wait for it, every other one is served."""
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.dir, exist_ok=True)
        self.store = Store(os.path.join(self.root, "metadata.db"))
        self.lazy = lazy
        if mounted is None:
            mounted = threading.Event()
            mounted.set()
        self.mounted = mounted
        # N clients pulling one image send N Prepares of each layer at once: the first fetches it, the
        # others wait for it and find it committed (instead of N fetches of the same TOC)
        self._targets = KeyedLocks()
        # a lazy layer is (re)opened, and removed, by one request at a time (by snapshot id)
        self._layers = KeyedLocks()
        # containerd's overlay snapshotter turns the inode index off where the kernel has the knob
        self.overlay_extra = ["index=off"] if os.path.exists("/sys/module/overlay/parameters/index") else []

    def close(self) -> None:
        self.store.close()

    def restore(self) -> tuple[int, int]:
        """Re-open every remote snapshot after a start; returns (restored, unavailable). Runs while
        requests are served: one that needs a layer not reopened yet reopens it itself, or waits for
        this loop if it is reopening that layer right now."""
        ok = bad = 0
        for snap in self.store.all():
            if snap.remote and self.lazy:
                opened = self._open_remote(snap)
                if opened is True:
                    ok += 1
                elif opened is False:
                    bad += 1
        return ok, bad

    def _open_remote(self, snap: Snapshot) -> bool | None:
        """Make lazy layer `snap` served (from its kept TOC, the registry for what is not kept): True
        when it is, False when it cannot be now, None when the snapshot was removed meanwhile."""
        with self._layers.hold(snap.id):
            if str(snap.id) in self.lazy.tree:
                return True
            current = self.store.get(snap.key)
            if current is None or current.id != snap.id:
                return None
            return self.lazy.restore(snap.id, snap.remote)

    # --- paths and mounts ----------------------------------------------------------------------------------

    def _home(self, snap: Snapshot) -> str:
        return os.path.join(self.dir, str(snap.id))

    def _fs(self, snap: Snapshot) -> str:
        if snap.remote is None:
            return os.path.join(self._home(snap), "fs")
        if self.lazy is None:
            raise SnapshotError("unavailable", f"snapshot {snap.key!r} is a lazy layer but lazy layers are off")
        self.mounted.wait()  # right after a start: the directory is handed out once the mount is there
        if str(snap.id) not in self.lazy.tree and not self._open_remote(snap):
            raise SnapshotError("unavailable", f"snapshot {snap.key!r} cannot be served: "
                                f"{self.lazy.unavailable.get(snap.id)}; check that the registry is reachable")
        return self.lazy.path(snap.id)

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.store.require(key))

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        lowers = [self._fs(p) for p in self.store.chain(snap)]
        if snap.kind == ACTIVE:
            fs = self._fs(snap)
            if not lowers:
                return [Mount("bind", fs, ["rbind", "rw"])]
            work = os.path.join(self._home(snap), "work")
            return [Mount("overlay", "overlay", [f"workdir={work}", f"upperdir={fs}", "lowerdir=" + ":".join(lowers)]
                          + self.overlay_extra)]
        if not lowers:  # a view of nothing: an empty read-only directory
            return [Mount("bind", self._fs(snap), ["rbind", "ro"])]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ["rbind", "ro"])]
        return [Mount("overlay", "overlay", ["lowerdir=" + ":".join(lowers)] + self.overlay_extra)]

    # --- the API -------------------------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        # The remote-snapshot labels come from the image (see LayerSource.from_labels): checked before
        # anything is created or fetched, also when this Prepare would not serve the layer lazily.
        try:
            check_labels(labels)
        except LabelError as e:
            raise SnapshotError("invalid_argument", f"Prepare {key!r}: {e}; nothing was created") from None
        labels = set_labels(labels)
        target = labels.get(REF_LABEL)
        if target and self.lazy is not None:
            source = LayerSource.from_labels(labels)
            if source is not None and self._prepare_remote(target, parent, labels, source):
                raise SnapshotError("already_exists", f"target snapshot {target!r} is served lazily")
        return self._create(key, parent, ACTIVE, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, VIEW, set_labels(labels))

    def _create(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> list[Mount]:
        snap = self.store.create(key, parent, kind, labels)
        try:
            os.makedirs(os.path.join(self._home(snap), "fs"), mode=0o755)
            if kind == ACTIVE:
                os.makedirs(os.path.join(self._home(snap), "work"), mode=0o711)
            return self._mounts(snap)
        except BaseException:
            self.store.remove(key)
            shutil.rmtree(self._home(snap), ignore_errors=True)
            raise

    def _prepare_remote(self, target: str, parent: str, labels: dict[str, str], source: LayerSource) -> bool:
        """True when `target` is (now) a committed lazy layer; False to let containerd download it."""
        with self._targets.hold(target):
            return self._prepare_remote_once(target, parent, labels, source)

    def _prepare_remote_once(self, target: str, parent: str, labels: dict[str, str], source: LayerSource) -> bool:
        existing = self.store.get(target)
        if existing is not None:
            return existing.kind == COMMITTED and existing.parent == parent
        if parent and self.store.get(parent) is None:
            return False  # the ordinary path reports the missing parent
        started = time.monotonic()
        try:
            fetched = self.lazy.fetch_verified(source)  # verified before it is committed; parsed after
        except FALLBACK_ERRORS as e:
            log.info("layer %s of %s is downloaded by containerd (cannot serve it lazily: %s)",
                     source.digest, source.reference, e)
            return False
        source.size = fetched.stats.size
        try:
            snap = self.store.create(target, parent, COMMITTED, {**labels, REMOTE_LABEL: "remote snapshot"},
                                     source.to_json())
        except SnapshotError as e:
            if e.code == "already_exists":  # a concurrent Prepare of the same layer won
                return True
            raise
        self.lazy.attach(snap.id, fetched)
        log.info("layer %s of %s served lazily as snapshot %d (%.0f ms)", source.digest, source.reference, snap.id,
                 (time.monotonic() - started) * 1000)
        return True

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        snap = self.store.require(key)
        size, inodes = (disk_usage(self._fs(snap)) if snap.kind == ACTIVE else (0, 0))
        self.store.commit(key, name, set_labels(labels), size, inodes)

    def remove(self, key: str) -> None:
        snap = self.store.remove(key)
        if snap.remote is not None:
            if self.lazy is not None:
                with self._layers.hold(snap.id):  # after a reopening of it that was under way
                    self.lazy.detach(snap.id)
        else:
            shutil.rmtree(self._home(snap), ignore_errors=True)

    def stat(self, key: str) -> Snapshot:
        return self.store.require(key)

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """containerd's semantics: no paths (or `labels`) replace all labels; `labels.K` sets K, or removes
        it when `labels` has no K or an empty K (BuildKit removes its temporary labels so)."""
        snap = self.store.require(name)
        labels = set_labels(labels)
        if not paths:
            new = dict(labels)
        else:
            new = dict(snap.labels)
            for p in paths:
                if p == "labels":
                    new = dict(labels)
                elif p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise SnapshotError("invalid_argument", f"cannot update field {p!r} of snapshot {name!r}: "
                                        "only labels can change")
        return self.store.set_labels(name, new)

    def list(self, filters: list[str]) -> list[Snapshot]:
        preds = [parse_filter(f) for f in filters if f]
        snaps = self.store.all()
        if not preds:
            return snaps
        return [s for s in snaps if any(all(t(s) for t in terms) for terms in preds)]

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.store.require(key)
        if snap.kind == ACTIVE:
            return disk_usage(self._fs(snap))
        if snap.remote is not None and self.lazy is not None:
            return self.lazy.usage(snap.id)
        return snap.size, snap.inodes

    def cleanup(self) -> int:
        """Remove directories no snapshot owns and the cached data of layers no snapshot uses."""
        snaps = self.store.all()
        ids = {str(s.id) for s in snaps}
        for name in os.listdir(self.dir):
            if name not in ids:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        if self.lazy is None:
            return 0
        return self.lazy.cleanup({s.remote["digest"] for s in snaps if s.remote})


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes in blocks, inodes) under `path`, each inode counted once, as containerd's fs.DiskUsage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return size, len(seen)


# --- containerd filters: `field==value,field2!=value2` (all must hold); several filters: any may hold --------

_TERM = re.compile(r'\s*(?P<field>[A-Za-z_]+(?:\.(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_./-]+))*)\s*'
                   r'(?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _field(snap: Snapshot, path: str) -> str | None:
    head, _, rest = path.partition(".")
    if head == "labels":
        return snap.labels.get(_unquote(rest)) if rest else None
    return {"name": snap.key, "parent": snap.parent,
            "kind": {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}.get(snap.kind, "unknown")}.get(head)


def parse_filter(text: str):
    terms = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos:
            raise SnapshotError("invalid_argument", f"cannot parse filter {text!r} at {pos}")
        pos = m.end()
        field_, op, value = m.group("field"), m.group("op"), m.group("value")
        value = _unquote(value.strip()) if value is not None else None
        if op is None:
            terms.append(lambda s, f=field_: _field(s, f) is not None)
        elif op == "==":
            terms.append(lambda s, f=field_, v=value: _field(s, f) == v)
        elif op == "!=":
            terms.append(lambda s, f=field_, v=value: _field(s, f) != v)
        else:
            rx = re.compile(value)
            terms.append(lambda s, f=field_, r=rx: (_field(s, f) or "") and r.search(_field(s, f)) is not None)
    return terms
