"""The on-disk chunk cache: verified, uncompressed chunks keyed by their chunkDigest.

Content addressed, so every mount of every image that holds the same chunk shares one copy, and an
entry is valid forever. Entries are written under a temporary name and renamed, so a crash never
leaves a half-written chunk under its digest; reads touch the file so eviction drops the least
recently used entries first when the cache passes its size limit.

The keys come from TOCs that strangers wrote: a key becomes a file name only through
lazybuild.digest (`sha256:` + 64 lowercase hex), so `sha256:../../etc/shadow` is refused, never
opened or unlinked. Every read hashes what it got, so a truncated or replaced file is a miss.

The cache is an optimisation: when the disk cannot take a chunk (full, quota, read-only, any I/O
error) the chunk is still served from memory and the mount goes on uncached; the log says so once,
not once per chunk.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import tempfile
import threading
import time

from lazybuild.digest import check_digest, digest_hex

log = logging.getLogger("lazybuild.mount")

DEFAULT_LIMIT_BYTES = 10 << 30
DEFAULT_MEMORY_BYTES = 64 << 20
TEMP_PREFIX = ".tmp-"
# A temporary file this old belongs to a writer that died (a live one renames within moments); younger
# ones may be another mount's write in progress on the same cache, so they are left alone.
STALE_TEMP_SECONDS = 60.0
# While storing keeps failing, the warning is repeated at most this often (with the count of misses).
WARN_EVERY_SECONDS = 600.0


class ChunkCache:
    def __init__(self, root: str, limit_bytes: int = DEFAULT_LIMIT_BYTES, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.root = os.path.join(root, "chunks", "sha256")
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self.memory_bytes = memory_bytes
        self._memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._memory_bytes = 0
        self.store_failures = 0  # chunks served but not kept because the disk refused them
        self._warned_at: float | None = None
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            self._store_failed(e, "creating the cache directory")
        # What the cache holds is measured by walking it, which takes a while when it holds many chunks:
        # in the background, so a mount (or the snapshotter's restart) does not wait for it. Chunks stored
        # meanwhile may be counted twice, which only brings an eviction forward.
        self._size = 0
        threading.Thread(target=self._measure_in_background, daemon=True, name="cache-measure").start()

    def _measure_in_background(self) -> None:
        total = self._measure()
        with self._lock:
            self._size += total
        self.evict_if_over()

    def _measure(self) -> int:
        """The bytes held, after dropping the temporary files of writers that died mid-write."""
        total = 0
        now = time.time()
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if f.startswith(TEMP_PREFIX) and now - st.st_mtime > STALE_TEMP_SECONDS:
                    self._remove(p)
                    continue
                total += st.st_size
        return total

    def path(self, digest: str) -> str:
        """The file of a chunk. Raises InvalidDigest (a ValueError naming the key) for anything that
        is not an exact sha256 digest: a key from a TOC never becomes any other path."""
        check_digest(digest, "chunk cache key")  # the error names what the digest was for
        hexpart = digest_hex(digest)
        return os.path.join(self.root, hexpart[:2], hexpart)

    def get(self, digest: str) -> bytes | None:
        """The chunk, or None. A cached file that no longer matches its digest is dropped, never served.

        Chunks verified by this process are kept in a small memory LRU too: the kernel reads a file in
        128 KiB pieces, and re-reading and re-hashing a 4 MiB chunk from disk for each would dominate.
        """
        path = self.path(digest)
        with self._lock:
            hit = self._memory.get(digest)
            if hit is not None:
                self._memory.move_to_end(digest)
                return hit
        try:
            # O_NOFOLLOW: the cache holds regular files only; a symlink planted there is not followed
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP (a symlink), EIO, EACCES: a miss, the chunk is fetched again
            log.debug("chunk cache: cannot open %s: %s", path, e)
            if e.errno == errno.ELOOP:
                self._remove(path)
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as e:
            log.debug("chunk cache: cannot read %s: %s", path, e)
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self._remove(path)  # truncated (a writer killed before the rename cannot do this) or altered
            return None
        try:
            os.utime(path)
        except OSError:  # gone meanwhile, or a read-only cache: the LRU order is only a hint
            pass
        self._remember(digest, data)
        return data

    def _remember(self, digest: str, data: bytes) -> None:
        with self._lock:
            if digest in self._memory:
                self._memory.move_to_end(digest)
                return
            self._memory[digest] = data
            self._memory_bytes += len(data)
            while self._memory_bytes > self.memory_bytes and self._memory:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= len(old)

    def memory_get(self, digest: str) -> bytes | None:
        """Only the memory LRU: never blocks on the disk."""
        with self._lock:
            hit = self._memory.get(digest)
            if hit is not None:
                self._memory.move_to_end(digest)
            return hit

    def has(self, digest: str) -> bool:
        """Whether a get() would likely hit (in memory or on disk): planning asks, reads verify."""
        path = self.path(digest)
        with self._lock:
            if digest in self._memory:
                return True
        return os.path.exists(path)

    def put(self, digest: str, data: bytes) -> bool:
        """Keep a verified chunk. Never raises for the disk: a chunk that cannot be written is still in
        the memory LRU, and the caller serves it anyway. Returns whether it is on disk."""
        path = self.path(digest)
        self._remember(digest, data)
        if os.path.exists(path):
            return True
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:  # ENOSPC, EDQUOT, EROFS, EIO...: serve uncached
            self._store_failed(e, f"storing chunk {digest}")
            return False
        finally:
            if tmp is not None:
                self._remove(tmp)
        with self._lock:
            self._size += len(data)
            over = self._size > self.limit_bytes
        if over:
            self.evict()
        return True

    def _store_failed(self, e: OSError, what: str) -> None:
        """One warning for a run of failures (repeated every WARN_EVERY_SECONDS while it lasts)."""
        now = time.monotonic()
        with self._lock:
            self.store_failures += 1
            count = self.store_failures
            quiet = self._warned_at is not None and now - self._warned_at < WARN_EVERY_SECONDS
            if not quiet:
                self._warned_at = now
        if quiet:
            log.debug("chunk cache %s: %s: %s", self.root, what, e)
            return
        log.warning("chunk cache %s cannot keep chunks (%s: %s); reads go on uncached, fetching again what "
                    "they need (%d chunk(s) not kept so far); free space on that disk or point the cache "
                    "elsewhere (--cache / cache_dir)", self.root, what, e.strerror or e, count)

    def discard(self, digest: str) -> int:
        """Drop one chunk (its layer is gone); returns the bytes freed. The key is checked first."""
        path = self.path(digest)
        try:
            size = os.lstat(path).st_size
        except OSError:
            return 0
        self._remove(path)
        with self._lock:
            old = self._memory.pop(digest, None)
            if old is not None:
                self._memory_bytes -= len(old)
            self._size -= size
        return size

    def evict_if_over(self) -> None:
        with self._lock:
            over = self._size > self.limit_bytes
        if over:
            self.evict()

    def evict(self) -> None:
        """Drop least recently used chunks until the cache is 10% under its limit."""
        entries = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if f.startswith(TEMP_PREFIX):
                    continue  # a write in progress
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        total = sum(e[1] for e in entries)
        target = self.limit_bytes * 9 // 10
        for _, size, p in entries:
            if total <= target:
                break
            self._remove(p)
            total -= size
        with self._lock:
            self._size = total

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:  # a read-only cache: nothing to do, reads verify what they find
            log.debug("chunk cache: cannot remove %s: %s", path, e)

