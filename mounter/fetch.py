"""Opening a layer from its registry: the footer and TOC first (the network half), then the index
(the CPU half), so a caller can fetch many layers in parallel and index each when it needs it.

The footer and TOC reads can be kept in a directory and replayed at the next open (a restart then
needs no registry to serve what the chunk cache holds); what is replayed is checked against the TOC
digest like anything fetched. A layer that is not eStargz is downloaded whole once, converted
locally and served the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from lazybuild import estargz
from lazybuild.digest import digest_hex
from lazybuild.estargz import LayerReader
from lazybuild.image import Descriptor
from lazybuild.registry import Registry

from .cache import ChunkCache
from .layer import WINDOW_BYTES, LayerError, LayerStats, LazyLayer, NotEStargz

log = logging.getLogger("lazybuild.mount")


class RemoteBlob:
    """A layer blob in a registry, read by range (the estargz Blob protocol), counting what crosses
    the network into the layer's stats."""

    def __init__(self, registry: Registry, repository: str, desc: Descriptor, stats: LayerStats):
        self.registry, self.repository, self.digest, self.size, self.stats = registry, repository, desc.digest, desc.size, stats

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each range (one request where the registry allows; see registry/ranges.py)."""
        parts = self.registry.read_ranges(self.repository, self.digest, ranges)
        self.stats.fetched_bytes += sum(len(p) for p in parts)
        return parts

    def read_at(self, offset: int, length: int) -> bytes:
        return self.read_many([(offset, offset + length)])[0]

    def stream(self, start: int, end: int) -> Iterator[bytes]:
        """[start, end) in one request, as it arrives (the prefetch stores chunks while it streams)."""
        for data in self.registry.stream_range(self.repository, self.digest, start, end):
            self.stats.fetched_bytes += len(data)
            yield data


class KeptReads:
    """A blob whose reads (the footer and TOC at open) are kept as files in a directory, one per
    (offset, length), written under a temporary name and renamed; later opens replay them."""

    def __init__(self, blob: RemoteBlob, directory: str, tail: bytes = b""):
        self.blob, self.dir, self.size = blob, directory, blob.size
        self.tail = tail  # the blob's last bytes, when the caller already has them

    def read_at(self, offset: int, length: int) -> bytes:
        path = os.path.join(self.dir, f"{offset}-{length}")
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) == length:
                return data
        except FileNotFoundError:
            pass
        if self.tail and offset >= self.size - len(self.tail) and offset + length <= self.size:
            start = offset - (self.size - len(self.tail))
            data = self.tail[start:start + length]
        else:
            data = self.blob.read_at(offset, length)
        # Keeping is an optimisation (a restart without the registry): a full or read-only disk only
        # costs the next open a fetch. What is kept is checked against the TOC digest when replayed.
        tmp = None
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            log.warning("cannot keep the TOC read %s of %s (%s); it is fetched again at the next open",
                        os.path.basename(path), self.blob.digest, e.strerror or e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return data


@dataclass
class FetchedLayer:
    """A layer whose footer and TOC are read but not parsed yet: verify_toc(), then build()."""
    index: int
    name: str
    blob: RemoteBlob
    reads: object  # the blob the TOC reads went through (KeptReads or the blob)
    toc: tuple[str, int, bytes]  # (kind, TOC offset, raw TOC JSON)
    stats: LayerStats

    @property
    def digest(self) -> str:
        return self.stats.digest

    @property
    def toc_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.toc[2]).hexdigest()

    def verify_toc(self, expected: str) -> None:
        """Raises estargz.TOCDigestMismatch unless the raw TOC hashes to `expected`."""
        if self.toc_digest != expected:
            raise estargz.TOCDigestMismatch(f"{self.name}: TOC digest is {self.toc_digest}, expected {expected}")

    def build(self, cache: ChunkCache) -> LazyLayer:
        """The CPU half: parse and index the TOC (a FormatError for a malformed or hostile one)."""
        reader = LayerReader(self.reads, name=self.name, toc=self.toc)
        return LazyLayer(self.index, reader, cache, self.stats, self.blob)


def fetch_layer(registry: Registry, repository: str, desc: Descriptor, index: int = 0,
                toc_dir: str | None = None, tail: bytes = b"") -> FetchedLayer:
    """The network half of opening: footer and TOC read (NotEStargz for a blob without an eStargz footer).

    With `toc_dir`, the reads are kept there and replayed on the next open; `tail`: the blob's last
    bytes if the caller fetched them already (with toc_dir only)."""
    stats = LayerStats(desc.digest, desc.size)
    stats.fetched_bytes += len(tail)
    blob = RemoteBlob(registry, repository, desc, stats)
    reads = KeptReads(blob, toc_dir, tail) if toc_dir else blob
    name = f"layer {index} ({desc.digest})"
    try:
        toc = LayerReader.fetch_toc(reads, name)
    except estargz.FooterError as e:
        raise NotEStargz(str(e)) from None
    return FetchedLayer(index, name, blob, reads, toc, stats)


def open_layer(registry: Registry, repository: str, desc: Descriptor, cache: ChunkCache, workdir: str,
               index: int = 0, verify: bool = True, toc_dir: str | None = None) -> LazyLayer:
    """Layer `index` of an image, ready to serve: its TOC verified against the manifest's annotation
    (a LayerError without one, unless not `verify`). A layer that is not eStargz is downloaded whole
    and converted under `workdir`. With `toc_dir`, the footer and TOC reads are kept there (see
    KeptReads) and the next open needs no request for them."""
    toc_digest = desc.annotations.get(estargz.TOC_DIGEST_ANNOTATION)
    kept = bool(toc_dir) and os.path.isdir(toc_dir) and bool(os.listdir(toc_dir))
    try:
        fetched = fetch_layer(registry, repository, desc, index, toc_dir=toc_dir)
        if kept and toc_digest:
            fetched.verify_toc(toc_digest)
    except (NotEStargz, estargz.FormatError, estargz.TOCDigestMismatch) as e:
        if kept:  # what was kept does not hold (a torn or altered file): drop it, read the registry again
            log.warning("the kept footer and TOC of %s are not usable (%s); fetching them again", desc.digest, e)
            shutil.rmtree(toc_dir, ignore_errors=True)
            return open_layer(registry, repository, desc, cache, workdir, index, verify, toc_dir)
        if isinstance(e, NotEStargz):
            return _download_whole(index, registry, repository, desc, cache, workdir)
        raise
    if toc_digest:
        fetched.verify_toc(toc_digest)
    elif verify:
        raise LayerError(f"layer {index} ({desc.digest}) has no {estargz.TOC_DIGEST_ANNOTATION} annotation, so its "
                         "TOC cannot be verified; convert the image with `lazybuild convert` or mount with "
                         "--insecure-skip-verify")
    layer = fetched.build(cache)
    layer.read_around = WINDOW_BYTES  # a miss brings its window (see layer.py); the snapshotter sets its own
    return layer


def _download_whole(index: int, registry: Registry, repository: str, desc: Descriptor, cache: ChunkCache,
                    workdir: str) -> LazyLayer:
    """Not eStargz: download once (the blob digest checked over every byte), convert locally (kept
    beside the cache, by layer digest), serve from it."""
    stats = LayerStats(desc.digest, desc.size, lazy=False)
    local = os.path.join(workdir, "layers", digest_hex(desc.digest) + ".esgz")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    if not os.path.exists(local):
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(local), prefix=".download-") as tmp:
            registry.fetch_blob(repository, desc.digest, tmp, size=desc.size)
            stats.fetched_bytes += desc.size
            tmp.flush()
            estargz.convert_file(tmp.name, local)
    return LazyLayer(index, LayerReader.open_file(local), cache, stats, None)
