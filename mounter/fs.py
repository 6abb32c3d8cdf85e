"""The only module that knows FUSE: a thin, read-only pyfuse3 translation of FUSE calls onto a tree of
rootfs.py (MergedTree, LayersTree or LayerDirs), and FuseMount, which mounts one in this process.

Reads run on worker threads (they may wait on the network), so lookups and getattrs keep being
answered while chunks arrive. Any failure to produce verified bytes is EIO, never data.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading

import pyfuse3
import trio

from .rootfs import Inode, MergedTree

log = logging.getLogger("lazybuild.mount")
ATTR_TIMEOUT_S = 3600.0  # the tree never changes under a mount


class Recorder:
    """`--record FILE`: NDJSON of first accesses, {"path", "layer"}, in order (the optimizer's input)."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")
        self.seen: set[int] = set()
        self.lock = threading.Lock()

    def access(self, inode: Inode) -> None:
        with self.lock:
            if inode.ino in self.seen:
                return
            self.seen.add(inode.ino)
            self.f.write(json.dumps({"path": inode.path, "layer": inode.layer}) + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


class LazyFS(pyfuse3.Operations):
    def __init__(self, tree: MergedTree, recorder: Recorder | None = None):
        super().__init__()
        self.tree = tree
        self.recorder = recorder
        self._listing: dict[int, list[tuple[str, int]]] = {}

    async def _ready(self, ino: int) -> None:
        """The snapshotter's tree builds a layer's directory after publishing it: wait for it (EIO if
        its build failed)."""
        if not self.tree.ready(ino):
            started = trio.current_time()
            ok = await trio.to_thread.run_sync(self.tree.wait_ready, ino)
            log.debug("waited %.1f ms for layer directory %d", (trio.current_time() - started) * 1000, ino)
            if not ok:
                raise pyfuse3.FUSEError(errno.EIO)

    def _inode(self, ino: int) -> Inode:
        inode = self.tree.inodes.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = inode.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid, a.st_gid = e.uid, e.gid
        a.st_rdev = os.makedev(e.dev_major, e.dev_minor) if e.type in ("char", "block") else 0
        a.st_size = e.size if e.type == "reg" else len(e.link_name.encode("utf-8", "surrogateescape")) if e.type == "symlink" else 0
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 4095) // 4096 * 8
        ns = int(inode.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT_S
        return a

    async def getattr(self, inode, ctx=None):
        await self._ready(inode)
        return self._attrs(self._inode(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        await self._ready(parent_inode)
        found = self.tree.lookup(parent_inode, os.fsdecode(name))
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._ready(found.ino)
        return self._attrs(self._inode(found.ino))

    async def readlink(self, inode, ctx):
        node = self._inode(inode)
        if node.entry.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self.recorder:
            self.recorder.access(node)
        return os.fsencode(node.entry.link_name)

    async def opendir(self, inode, ctx):
        await self._ready(inode)
        if not self._inode(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._inode(fh)
        names = self._listing.get(fh)
        if names is None:  # sorted once: a directory of 100,000 entries is read in many batches
            names = self._listing[fh] = sorted(node.children.items())
        for i in range(start_id, len(names)):
            name, ino = names[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(self.tree.inodes[ino]), i + 1):
                break

    async def releasedir(self, fh):
        self._listing.pop(fh, None)  # the snapshotter's root changes as layers come and go

    async def open(self, inode, flags, ctx):
        node = self._inode(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.entry.type != "reg":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self.recorder:
            self.recorder.access(node)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        try:
            hit = self.tree.read_if_in_memory(fh, off, size)  # most reads: a chunk read moments ago
            if hit is not None:
                return hit
            return await trio.to_thread.run_sync(self.tree.read, fh, off, size)
        except Exception as e:  # network gone, corrupt chunk: the caller gets EIO and the log says why
            log.error("read of %s at %d failed: %s", self.tree.inodes[fh].path, off, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        pass

    async def getxattr(self, inode, name, ctx):
        await self._ready(inode)
        value = self._inode(inode).entry.xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx):
        await self._ready(inode)
        return [os.fsencode(k) for k in self._inode(inode).entry.xattrs]

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx):
        # overlayfs refuses a lower layer whose filesystem cannot answer statfs
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.tree.total_size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


class FuseMount:
    """`tree` served read-only at `mountpoint` by this process (pyfuse3 serves one mount per process).

    Run `await serve()` inside trio; `stop()` (from a signal handler) makes it return; `close()`
    unmounts. With `record`, first accesses are appended to that file (see Recorder)."""

    def __init__(self, tree: MergedTree, mountpoint: str, fsname: str = "lazybuild", record: str | None = None):
        self.recorder = Recorder(record) if record else None
        # The kernel checks permissions from the modes we report (default_permissions); allow_other lets
        # containers running as other users read the tree.
        options = set(pyfuse3.default_options) | {f"fsname={fsname}", "ro", "allow_other", "default_permissions"}
        try:
            pyfuse3.init(LazyFS(tree, self.recorder), mountpoint, options)
        except BaseException:
            if self.recorder:
                self.recorder.close()
            raise

    async def serve(self) -> None:
        await pyfuse3.main()

    def stop(self) -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        try:
            pyfuse3.close(unmount=True)
        finally:
            if self.recorder:
                self.recorder.close()
