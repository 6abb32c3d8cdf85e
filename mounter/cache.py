"""The on-disk chunk cache: verified, uncompressed chunks keyed by their chunkDigest.

Content addressed, so every mount of every image that holds the same chunk shares one copy, and an
entry is valid forever. Entries are written under a temporary name and renamed, so a crash never
leaves a half-written chunk under its digest; reads touch the file so eviction drops the least
recently used entries first when the cache passes its size limit.
"""

from __future__ import annotations

import collections
import hashlib
import os
import tempfile
import threading

DEFAULT_LIMIT_BYTES = 10 << 30
DEFAULT_MEMORY_BYTES = 64 << 20


class ChunkCache:
    def __init__(self, root: str, limit_bytes: int = DEFAULT_LIMIT_BYTES, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.root = os.path.join(root, "chunks", "sha256")
        os.makedirs(self.root, exist_ok=True)
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._size = self._measure()
        self.memory_bytes = memory_bytes
        self._memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._memory_bytes = 0

    def _measure(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def path(self, digest: str) -> str:
        hexpart = digest.split(":", 1)[1]
        return os.path.join(self.root, hexpart[:2], hexpart)

    def get(self, digest: str) -> bytes | None:
        """The chunk, or None. A cached file that no longer matches its digest is dropped, never served.

        Chunks verified by this process are kept in a small memory LRU too: the kernel reads a file in
        128 KiB pieces, and re-reading and re-hashing a 4 MiB chunk from disk for each would dominate.
        """
        with self._lock:
            hit = self._memory.get(digest)
            if hit is not None:
                self._memory.move_to_end(digest)
                return hit
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self._remove(path)
            return None
        try:
            os.utime(path)
        except FileNotFoundError:
            pass
        self._remember(digest, data)
        return data

    def _remember(self, digest: str, data: bytes) -> None:
        with self._lock:
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
        return os.path.exists(self.path(digest))

    def put(self, digest: str, data: bytes) -> None:
        path = self.path(digest)
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._remember(digest, data)
        with self._lock:
            self._size += len(data)
            over = self._size > self.limit_bytes
        if over:
            self.evict()

    def discard(self, digest: str) -> int:
        """Drop one chunk (its layer is gone); returns the bytes freed."""
        path = self.path(digest)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
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
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
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
