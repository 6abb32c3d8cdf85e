"""The trees a mount shows, as inode tables over layers: pure data, no FUSE here (fs.py serves them).

MergedTree: an image's root filesystem as overlayfs would show it. Layers apply bottom to top:
`.wh.NAME` hides NAME (and all below it) in lower layers, `.wh..wh..opq` hides every lower entry of
its directory, a directory over a directory merges, anything else replaces.
LayersTree (`--layers`): one directory per layer, each as overlayfs wants a lower dir.
LayerDirs (the snapshotter): layer directories that come and go while mounted.
In all of them, names in one layer that are hardlinks of each other share one inode.
"""

from __future__ import annotations

import dataclasses
import posixpath
import stat
import threading
from dataclasses import dataclass, field

from lazybuild.estargz import Node, TOCEntry
from lazybuild.estargz.toc import parse_modtime

from .layer import LazyLayer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ROOT_INODE = 1

_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
              "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclass
class Inode:
    ino: int
    path: str  # the first name it was found under
    layer: int
    entry: TOCEntry
    nlink: int = 1
    children: dict[str, int] = field(default_factory=dict)  # directories only: name -> inode

    @property
    def mode(self) -> int:
        return _TYPE_BITS[self.entry.type] | (self.entry.mode & 0o7777)

    @property
    def is_dir(self) -> bool:
        return self.entry.type == "dir"

    @property
    def mtime(self) -> float:
        return parse_modtime(self.entry.modtime)


class MergedTree:
    """The merged tree of `layers` (bottom first): `inodes` by number, reads by inode."""

    def __init__(self, layers: list[LazyLayer]):
        self.layers = layers
        entries: dict[str, tuple[int, Node]] = {}  # path -> (layer, node)
        children: dict[str, set[str]] = {"": set()}
        root = (0, layers[0].reader.nodes[""]) if layers else None

        def remove(path: str) -> None:
            for name in list(children.pop(path, ())):
                remove(posixpath.join(path, name) if path else name)
            entries.pop(path, None)
            parent = posixpath.dirname(path)
            children.get(parent, set()).discard(posixpath.basename(path))

        for li, layer in enumerate(layers):
            nodes = list(layer.reader.walk())
            for node in nodes:  # whiteouts first: they only ever hide what lower layers had
                base, parent = posixpath.basename(node.path), posixpath.dirname(node.path)
                if base == OPAQUE:
                    for name in list(children.get(parent, ())):
                        remove(posixpath.join(parent, name) if parent else name)
                elif base.startswith(WHITEOUT):
                    remove(posixpath.join(parent, base[len(WHITEOUT):]) if parent else base[len(WHITEOUT):])
            for node in nodes:
                base, parent = posixpath.basename(node.path), posixpath.dirname(node.path)
                if base.startswith(WHITEOUT):
                    continue
                old = entries.get(node.path)
                if old is not None and not (old[1].entry.type == "dir" and node.entry.type == "dir"):
                    remove(node.path)
                entries[node.path] = (li, node)
                children.setdefault(parent, set()).add(base)
                if node.entry.type == "dir":
                    children.setdefault(node.path, set())
            if layer.reader.nodes[""].entry.name:  # the layer's own "./" entry carries the root's metadata
                root = (li, layer.reader.nodes[""])

        self.inodes: dict[int, Inode] = {}
        by_entry: dict[tuple[int, int], int] = {}
        root_layer, root_node = root if root else (0, Node("", TOCEntry(name="", type="dir", mode=0o755)))
        self.inodes[ROOT_INODE] = Inode(ROOT_INODE, "", root_layer, root_node.entry, 2)
        next_ino = ROOT_INODE + 1
        for path in sorted(entries, key=lambda p: p.split("/")):
            li, node = entries[path]
            key = (li, id(node.entry))
            ino = by_entry.get(key) if node.entry.type != "dir" else None
            if ino is None:
                ino = next_ino
                next_ino += 1
                self.inodes[ino] = Inode(ino, path, li, node.entry)
                by_entry[key] = ino
            else:
                self.inodes[ino].nlink += 1
            parent = self.ino_at(posixpath.dirname(path))
            self.inodes[parent].children[posixpath.basename(path)] = ino
        for inode in self.inodes.values():
            if inode.is_dir:
                inode.nlink = 2 + sum(1 for c in inode.children.values() if self.inodes[c].is_dir)
        self.total_size = sum(i.entry.size for i in self.inodes.values() if i.entry.type == "reg")

    def ino_at(self, path: str) -> int:
        """The inode number of an existing path ("" is the root)."""
        if path == "":
            return ROOT_INODE
        node = self.inodes[ROOT_INODE]
        for part in path.split("/"):
            node = self.inodes[node.children[part]]
        return node.ino

    def lookup(self, parent: int, name: str) -> Inode | None:
        p = self.inodes.get(parent)
        ino = p.children.get(name) if p else None
        return self.inodes[ino] if ino else None

    def ready(self, ino: int) -> bool:
        """Whether the inode can be served now (always: this tree is built whole; see LayerDirs)."""
        return True

    def wait_ready(self, ino: int) -> bool:
        """Block until the inode can be served; False if it never will (see LayerDirs)."""
        return True

    def read_if_in_memory(self, ino: int, offset: int, size: int) -> bytes | None:
        inode = self.inodes[ino]
        if offset >= inode.entry.size:
            return b""
        layer = self.layers[inode.layer]
        return layer.read_if_in_memory(inode.entry.path, offset, min(size, inode.entry.size - offset))

    def read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self.inodes[ino]
        if offset >= inode.entry.size:
            return b""
        layer = self.layers[inode.layer]
        return layer.read(inode.entry.path, offset, min(size, inode.entry.size - offset))


class LayersTree(MergedTree):
    """`--layers`: one directory per layer (`0`, `1`, ... bottom first), each the layer as overlayfs wants a
    lower dir: `.wh.NAME` becomes a 0:0 character device NAME, `.wh..wh..opq` becomes the xattr
    `trusted.overlay.opaque=y` on its directory."""

    def __init__(self, layers: list[LazyLayer]):
        self.layers = layers
        self.inodes = {ROOT_INODE: Inode(ROOT_INODE, "", 0, TOCEntry(name="", type="dir", mode=0o755), 2)}
        self.total_size = 0
        self._next_ino = ROOT_INODE + 1
        for li, layer in enumerate(layers):
            self._add_dir(str(li), li, layer)

    def _add_dir(self, name: str, li: int, layer: LazyLayer, top_ino: int | None = None) -> list[int]:
        """Add `layer` as the root directory `name` (inode `top_ino` if it was reserved); returns the
        inode numbers it got."""
        if top_ino is None:
            start, next_ino = self._next_ino, self._next_ino + 1
        else:
            start, next_ino = top_ino, self._next_ino
        inodes: dict[int, Inode] = {}
        top = Inode(start, name, li, layer.reader.nodes[""].entry)
        if top.entry.type != "dir" or not top.entry.name:
            top.entry = TOCEntry(name="", type="dir", mode=0o755)
        inodes[start] = top
        by_path = {"": top}
        by_entry: dict[int, int] = {}
        nodes = list(layer.reader.walk())
        names = {n.path for n in nodes}
        for node in nodes:
            parent, _, base = node.path.rpartition("/")  # normalized paths: dirname, basename
            pdir = by_path[parent]
            if base == OPAQUE:
                pdir.entry = _with_xattr(pdir.entry, "trusted.overlay.opaque", b"y")
                continue
            entry = node.entry
            if base.startswith(WHITEOUT):
                name_ = base[len(WHITEOUT):]
                if (posixpath.join(parent, name_) if parent else name_) in names:
                    continue  # the same layer also has the name: the entry wins, as in the reference
                entry = TOCEntry(name=name_, type="char", mode=0, dev_major=0, dev_minor=0)
                base = name_
            ino = by_entry.get(id(entry)) if entry.type != "dir" else None
            if ino is None:
                ino = next_ino
                next_ino += 1
                inodes[ino] = Inode(ino, node.path, li, entry)
                by_entry[id(entry)] = ino
            else:
                inodes[ino].nlink += 1
            pdir.children[base] = ino
            if entry.type == "dir":
                by_path[node.path] = inodes[ino]
        for inode in inodes.values():
            if inode.is_dir:
                inode.nlink = 2 + sum(1 for c in inode.children.values() if inodes[c].is_dir)
        self._next_ino = next_ino
        # published whole, the directory last: a lookup never sees a half-built layer
        self.inodes.update(inodes)
        self.total_size += sum(i.entry.size for i in inodes.values() if i.entry.type == "reg")
        root = self.inodes[ROOT_INODE]
        root.children[name] = start
        root.nlink = 2 + len(root.children)
        return list(inodes)


class LayerDirs(LayersTree):
    """The snapshotter's tree: layers come and go while mounted, each a root directory named by the
    caller (a snapshot id, never reused, so no kernel cache can show a removed layer under a new name).

    A directory can be reserved before its layer is built (`reserve`, then `fill` or `fail`): the
    filesystem makes every access to a reserved directory wait until then, and a failed one is EIO,
    never an empty directory."""

    def __init__(self):
        super().__init__([])
        self.layers: dict[int, LazyLayer] = {}  # type: ignore[assignment]  # slot -> layer (Inode.layer)
        self._owned: dict[str, tuple[int | None, list[int]]] = {}  # name -> (slot, inodes)
        self._pending: dict[int, threading.Event] = {}  # reserved top inodes -> set when filled or failed
        self._failed: set[int] = set()
        self._slots = 0
        self._lock = threading.Lock()

    def reserve(self, name: str) -> None:
        with self._lock:
            if name in self._owned:
                raise ValueError(f"layer directory {name} exists")
            ino = self._next_ino
            self._next_ino += 1
            self._pending[ino] = threading.Event()
            self.inodes[ino] = Inode(ino, name, -1, TOCEntry(name="", type="dir", mode=0o755))
            self._owned[name] = (None, [ino])
            root = self.inodes[ROOT_INODE]
            root.children[name] = ino
            root.nlink = 2 + len(root.children)

    def fill(self, name: str, layer: LazyLayer) -> bool:
        """Build the reserved directory `name` from `layer`; False if it was removed meanwhile."""
        with self._lock:
            owned = self._owned.get(name)
            if owned is None:
                return False
            top = owned[1][0]
            slot = self._slots
            self._slots += 1
            self.layers[slot] = layer
            self._owned[name] = (slot, self._add_dir(name, slot, layer, top_ino=top))
            event = self._pending.pop(top, None)
        if event:
            event.set()
        return True

    def fail(self, name: str) -> None:
        with self._lock:
            owned = self._owned.get(name)
            if owned is None:
                return
            top = owned[1][0]
            self._failed.add(top)
            event = self._pending.pop(top, None)
        if event:
            event.set()

    def add(self, name: str, layer: LazyLayer) -> None:
        self.reserve(name)
        self.fill(name, layer)

    def wait_ready(self, ino: int) -> bool:
        """Block until a reserved directory is built; False if it failed. Instant for everything else."""
        event = self._pending.get(ino)
        if event is not None:
            event.wait()
        return ino not in self._failed

    def ready(self, ino: int) -> bool:
        return ino not in self._pending and ino not in self._failed

    def remove(self, name: str) -> LazyLayer | None:
        with self._lock:
            owned = self._owned.pop(name, None)
            if owned is None:
                return None
            slot, inos = owned
            root = self.inodes[ROOT_INODE]
            root.children.pop(name, None)
            root.nlink = 2 + len(root.children)
            for ino in inos:
                inode = self.inodes.pop(ino)
                if inode.entry.type == "reg":
                    self.total_size -= inode.entry.size
            self._failed.discard(inos[0])
            event = self._pending.pop(inos[0], None)
        if event:
            event.set()
        return self.layers.pop(slot) if slot is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self._owned

    def built(self) -> dict[str, LazyLayer]:
        """The layers whose directories are built, by name."""
        with self._lock:
            return {name: self.layers[slot] for name, (slot, _) in self._owned.items() if slot is not None}


def _with_xattr(entry: TOCEntry, key: str, value: bytes) -> TOCEntry:
    return dataclasses.replace(entry, xattrs={**entry.xattrs, key: value})
