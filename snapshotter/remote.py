"""Remote snapshots: the labels containerd passes with a layer's Prepare, turned into an eStargz layer
served lazily as one directory of the snapshotter's single FUSE mount.

Labels (containerd copies every layer annotation under `containerd.io/snapshot/` onto the Prepare):
`containerd.io/snapshot/remote/stargz.reference|.digest|.layers` as ctr-remote, nerdctl and BuildKit
set them, or CRI's `containerd.io/snapshot/cri.image-ref|.layer-digest|.image-layers`, plus the
manifest's `containerd.io/snapshot/stargz/toc.digest`, against which the TOC is verified. Every one of
them is checked (exact digests, a strictly parsed reference) before it names a file or a fetch; see
LayerSource.from_labels for which source wins under CRI.

A layer's footer and TOC reads are kept under ROOT/tocs/sha256-<hex> and its chunks in the shared chunk
cache, so after a restart a layer opens without the registry and serves whatever the cache holds. What
is kept is checked again when it is read back: directory names, the chunk lists, the TOC digest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from lazybuild import estargz
from lazybuild.digest import check_digest, digest_hex, is_digest
from lazybuild.errors import InputError
from lazybuild.estargz.reader import TAIL_READ_BYTES
from lazybuild.image import Descriptor
from lazybuild.mounter import (ChunkCache, FetchedLayer, LayerDirs, LayerError, LazyLayer, NotEStargz, Prefetch,
                               background_fetch, fetch_layer)
from lazybuild.registry import Reference, Registry, RegistryError
from lazybuild.registry.client import system_tls_context

from .config import Config, Host

log = logging.getLogger("lazybuild.snapshotter")

REF_LABEL = "containerd.io/snapshot.ref"  # the chain ID containerd will look the snapshot up by
REMOTE_LABEL = "containerd.io/snapshot/remote"  # marks our committed remote snapshots, as stargz does
STARGZ_REF, STARGZ_DIGEST, STARGZ_LAYERS = (f"containerd.io/snapshot/remote/stargz.{k}"
                                            for k in ("reference", "digest", "layers"))
CRI_REF, CRI_DIGEST, CRI_LAYERS = (f"containerd.io/snapshot/cri.{k}" for k in ("image-ref", "layer-digest",
                                                                               "image-layers"))
TOC_LABEL = estargz.TOC_DIGEST_ANNOTATION
_DIGEST_LABELS = (STARGZ_DIGEST, CRI_DIGEST, TOC_LABEL)
_LIST_LABELS = (STARGZ_LAYERS, CRI_LAYERS)
_REF_LABELS = (STARGZ_REF, CRI_REF)
LABEL_VALUE_MAX = 4096  # containerd refuses longer labels (key + value), so none of ours is longer
# host[:port] of a reference: DNS labels or a bracketed IPv6 address; nothing that could turn the
# registry URL into another one (userinfo, a path, a query, spaces)
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_KEPT_RE = re.compile(r"sha256-[0-9a-f]{64}")  # the names _toc_dir makes, the only ones cleanup touches
# Chunks kept in memory besides the cache files. The kernel keeps what it read of our files in its page
# cache (FUSE keep_cache), so this copy only serves the FUSE reads that walk through a chunk just
# fetched (a 4 MiB chunk is 32 reads of 128 KiB): a few chunks, not the mounter's 64 MiB default.
MEMORY_CACHE_BYTES = 16 << 20
# A layer fetched ahead of its Prepare (containerd prepares an image's layers one after another, within
# seconds) is dropped if no Prepare has taken it by then.
AHEAD_KEPT_SECONDS = 120.0


class LabelError(InputError):
    """A Prepare label that cannot be used: the message names the label and what was wrong."""


def _strict_reference(label: str, text: str) -> str:
    if not text or len(text) > LABEL_VALUE_MAX or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise LabelError(f"label {label}: {text[:200]!r} is not an image reference")
    try:
        ref = Reference.parse(text)
    except ValueError as e:
        raise LabelError(f"label {label}: {e}") from None
    if not _HOST_RE.fullmatch(ref.host):
        raise LabelError(f"label {label}: {ref.host!r} in {text[:200]!r} is not a registry host[:port]")
    return text


def _digest_list(label: str, value: str) -> list[str]:
    if len(value) > LABEL_VALUE_MAX:
        raise LabelError(f"label {label}: {len(value)} characters, more than containerd allows ({LABEL_VALUE_MAX})")
    if not value:
        return []
    return [check_digest(d, f"label {label}, item {i}") for i, d in enumerate(value.split(","))]


def set_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels that are set: containerd's label stores drop a label whose value is empty (that is how
    a label is removed), and BuildKit sends `containerd.io/snapshot/stargz/toc.digest` empty for every
    layer without the annotation (util/estargz/labels.go), so an empty label means an absent one."""
    return {k: v for k, v in labels.items() if v != ""}


def check_labels(labels: dict[str, str]) -> None:
    """Refuse (LabelError, naming the label) a Prepare whose remote-snapshot labels are not exact digests
    and references: they become file names under ROOT/tocs, cache keys and registry requests. All
    present ones are checked, also those that lose to CRI's: a malformed one marks a hostile image.
    Empty ones are absent (set_labels)."""
    labels = set_labels(labels)
    try:
        for name in _DIGEST_LABELS:
            if name in labels:
                check_digest(labels[name], f"label {name}")
        for name in _LIST_LABELS:
            if name in labels:
                _digest_list(name, labels[name])
    except ValueError as e:
        raise LabelError(str(e)) from None
    for name in _REF_LABELS:
        if name in labels:
            _strict_reference(name, labels[name])
# errors that mean "this layer cannot be served lazily now": containerd then downloads it
FALLBACK_ERRORS = (LayerError, RegistryError, estargz.EStargzError, httpx.HTTPError, OSError, ValueError)


@dataclass
class LayerSource:
    reference: str
    digest: str
    toc_digest: str = ""
    neighbours: list[str] = field(default_factory=list)  # the image's other layers, to open ahead
    size: int = 0

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> "LayerSource | None":
        """Where the layer comes from, or None (containerd downloads it). Raises LabelError.

        Who writes which label matters: containerd's unpacker copies each layer's own annotations under
        `containerd.io/snapshot/` onto its Prepare, so an image's author can write any of these. Under
        Kubernetes, the CRI plugin (with `disable_snapshot_annotations = false`) sets cri.image-ref,
        cri.layer-digest and cri.image-layers itself, from the pull the kubelet asked for, over whatever
        the image said. So whenever a cri.* source label is present, the CRI triple alone decides, and
        the stargz.* labels are ignored, never a fallback: an image's annotations must not choose which
        registry (fetched with this node's credentials) or which layer is served. Without CRI, the
        stargz.* labels are what ctr-remote, nerdctl, BuildKit and `lazybuild rpull` set.
        """
        check_labels(labels)
        labels = set_labels(labels)
        if any(name in labels for name in (CRI_REF, CRI_DIGEST, CRI_LAYERS)):
            triple = (CRI_REF, CRI_DIGEST, CRI_LAYERS)
        else:
            triple = (STARGZ_REF, STARGZ_DIGEST, STARGZ_LAYERS)
        ref_label, digest_label, layers_label = triple
        if ref_label not in labels or digest_label not in labels:
            return None
        digest = labels[digest_label]
        others = [d for d in _digest_list(layers_label, labels.get(layers_label, "")) if d != digest]
        return cls(labels[ref_label], digest, labels.get(TOC_LABEL, ""), others)

    @property
    def ref(self) -> Reference:
        return Reference.parse(self.reference)

    def to_json(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "tocDigest": self.toc_digest, "size": self.size}

    @classmethod
    def from_json(cls, d: dict) -> "LayerSource":
        """A source kept in the metadata store, checked as a label would be (an older store, or one
        edited by hand, must not name other paths either). Raises LabelError."""
        try:
            digest = check_digest(d.get("digest"), "kept layer digest")
            toc = d.get("tocDigest", "")
            if toc:
                check_digest(toc, "kept TOC digest")
        except ValueError as e:
            raise LabelError(str(e)) from None
        size = d.get("size", 0)
        if not isinstance(size, int) or size < 0:
            raise LabelError(f"kept layer {digest}: size {size!r} is not a byte count")
        return cls(_strict_reference("kept reference", str(d.get("reference", ""))), digest, toc, [], size)


class LazyLayers:
    """Every lazily served layer of the snapshotter: opened from a registry (or from what a previous run
    kept), published as FUSE directory `<snapshot id>`, prefetched, fetched in the background."""

    def __init__(self, root: str, cfg: Config):
        self.cfg = cfg
        self.root = root
        self.mountpoint = os.path.join(root, "fuse")
        self.tocs = os.path.join(root, "tocs")
        self._drop_partial_writes()
        self.cache = ChunkCache(cfg.cache_dir or os.path.join(root, "cache"), cfg.cache_limit_bytes,
                                memory_bytes=MEMORY_CACHE_BYTES)
        self.tree = LayerDirs()
        self.unavailable: dict[int, str] = {}  # snapshot id -> why it cannot be served
        self._registries: dict[tuple[str, bool], Registry] = {}
        # (reference host/repo, digest) -> (when, opening layer): a neighbour's footer and TOC, fetched
        # ahead of its Prepare
        self._ahead: dict[tuple[str, str], tuple[float, Future]] = {}
        self._served: dict[int, str] = {}  # snapshot id -> layer digest, of the layers attached
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="open-layer")
        self._stops: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the HTTP and TLS stacks once at start (the first registry client otherwise costs ~0.1 s
        inside the first Prepare)."""
        def load():
            system_tls_context()
            with httpx.Client(verify=system_tls_context()):
                pass
        threading.Thread(target=load, daemon=True, name="warm-up").start()

    def close(self) -> None:
        for stop in self._stops.values():
            stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for reg in self._registries.values():
            reg.close()

    def path(self, sid: int) -> str:
        return os.path.join(self.mountpoint, str(sid))

    def _registry(self, host: Host) -> Registry:
        key = (host.host, host.insecure)
        reg = self._registries.get(key)
        if reg is None:  # made outside the lock: it may probe the host (TLS or plain HTTP) for a while
            made = Registry(host.host, insecure=host.insecure, loopback=True if host.insecure else None,
                            timeout_s=self.cfg.timeout_seconds)
            with self._lock:
                reg = self._registries.setdefault(key, made)
            if reg is not made:
                made.close()
        return reg

    def _toc_dir(self, digest: str) -> str:
        """ROOT/tocs/sha256-<hex>: only a checked digest names it (InvalidDigest otherwise)."""
        return os.path.join(self.tocs, "sha256-" + digest_hex(digest))

    def _drop_partial_writes(self) -> None:
        """At start (one daemon per root): what a killed daemon was writing under ROOT/tocs never
        became a kept file (they are renamed into place); remove the temporary files it left."""
        if not os.path.isdir(self.tocs):
            return
        for name in os.listdir(self.tocs):
            d = os.path.join(self.tocs, name)
            if not _KEPT_RE.fullmatch(name) or os.path.islink(d) or not os.path.isdir(d):
                continue
            for f in os.listdir(d):
                if f.startswith(".tmp-") or f.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(d, f))
                    except OSError:
                        pass

    # --- opening: fetch (footer + TOC, network) then build (parse + index, CPU) ---------------------------

    def _fetch(self, source: LayerSource) -> FetchedLayer:
        """Fetch from the first of the host's mirrors (then the host) that serves the layer."""
        ref = source.ref
        errors = []
        for host in self.cfg.candidates(ref.host):
            try:
                reg = self._registry(host)
                size, tail = source.size, b""
                if not size and not os.path.isdir(self._toc_dir(source.digest)):
                    # size and the tail holding footer and TOC in one request (no HEAD)
                    size, tail = reg.read_tail(ref.repository, source.digest, TAIL_READ_BYTES)
                elif not size:
                    size = reg.blob_size(ref.repository, source.digest)
                    if size is None:
                        raise LayerError(f"{reg.blob_url(ref.repository, source.digest)} answered 404: no such blob")
                desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", source.digest, size)
                return fetch_layer(reg, ref.repository, desc, toc_dir=self._toc_dir(source.digest), tail=tail)
            except NotEStargz:
                raise  # no mirror will make it one
            except FALLBACK_ERRORS as e:
                errors.append(f"{host.host}: {e}")
        raise LayerError("; ".join(errors))

    def fetch(self, source: LayerSource) -> FetchedLayer:
        """The layer's footer and TOC, fetched ahead if a neighbour's Prepare started it. The image's other
        layers start now, in parallel: containerd prepares them one after another, each waiting for the last."""
        ref = source.ref
        now = time.monotonic()
        with self._lock:
            # A neighbour already served (a base layer shared with an image pulled before) gets no Prepare
            # that would take its fetch; nor does one whose pull stopped. Their TOCs are not kept waiting.
            served = set(self._served.values())
            for key, (when, ahead) in list(self._ahead.items()):
                if now - when > AHEAD_KEPT_SECONDS:
                    del self._ahead[key]
                    ahead.cancel()
            for digest in source.neighbours:
                key = (f"{ref.host}/{ref.repository}", digest)
                if key not in self._ahead and digest not in served:
                    self._ahead[key] = (now, self._pool.submit(self._fetch, LayerSource(source.reference, digest)))
            _, ahead = self._ahead.pop((f"{ref.host}/{ref.repository}", source.digest), (0.0, None))
        if ahead is not None and not ahead.cancelled():
            try:
                return ahead.result()
            except FALLBACK_ERRORS:
                pass
        return self._fetch(source)

    def check_toc(self, fetched: FetchedLayer, source: LayerSource) -> None:
        if source.toc_digest:
            fetched.verify_toc(source.toc_digest)

    def fetch_verified(self, source: LayerSource) -> FetchedLayer:
        """fetch() + check_toc(). A kept TOC that does not match its digest (a disk error, a hand edit) is
        dropped and read from the registry once more instead of making the layer unavailable.

        A layer without a TOC digest (unless insecure_skip_verify) is refused before any request: it
        cannot be verified, and BuildKit prepares every plain gzip layer so, with the label empty."""
        if not source.toc_digest and not self.cfg.insecure_skip_verify:
            ref = source.ref
            with self._lock:  # a neighbour's Prepare may have started it: nobody will take that
                _, ahead = self._ahead.pop((f"{ref.host}/{ref.repository}", source.digest), (0.0, None))
            if ahead is not None:
                ahead.cancel()
            raise LayerError(f"layer {source.digest} has no {estargz.TOC_DIGEST_ANNOTATION} label, so its TOC "
                             "cannot be verified (set insecure_skip_verify = true to mount it anyway)")
        kept = self._toc_dir(source.digest)
        had_kept = os.path.isdir(kept)
        fetched = self.fetch(source)
        try:
            self.check_toc(fetched, source)
        except estargz.TOCDigestMismatch as e:
            if not had_kept:
                raise
            log.warning("kept TOC of layer %s does not match its digest (%s); reading it from the registry again",
                        source.digest, e)
            shutil.rmtree(kept, ignore_errors=True)
            fetched = self._fetch(source)
            self.check_toc(fetched, source)
        return fetched

    # --- serving -------------------------------------------------------------------------------------------

    def attach(self, sid: int, fetched: FetchedLayer, wait: bool = False) -> None:
        """Publish directory `sid` now and build the layer behind it on a worker (FUSE accesses wait for
        it): containerd goes on with the next layer meanwhile. Then prefetch and fetch in the background."""
        name = str(sid)
        self.tree.reserve(name)
        with self._lock:
            self._served[sid] = fetched.digest
        self.unavailable.pop(sid, None)

        def build() -> None:
            try:
                layer = fetched.build(self.cache)
            except Exception as e:  # a TOC whose digest matched but does not parse: EIO, never an empty dir
                self.unavailable[sid] = f"layer {fetched.digest}: {e}"
                log.error("snapshot %d: %s", sid, self.unavailable[sid])
                self.tree.fail(name)
                return
            # An optimized layer already brings what its workload reads in the prefetch; its later misses
            # are scattered, so reading around them would only add bytes.
            layer.read_around = 0 if layer.has_prefetch_landmark else self.cfg.read_around_bytes
            layer.last_read = time.monotonic()  # the background fetch waits for a first quiet period
            prefetch = Prefetch(layer, self.cfg.prefetch)  # reads of its chunks wait for the stream
            try:
                filled = self.tree.fill(name, layer)
            except BaseException:
                prefetch.cancel()
                raise
            if not filled:  # removed while it was being built
                prefetch.cancel()
                return
            stop = self._stops[sid] = threading.Event()
            prefetch.run()
            self._write_chunk_list(layer)
            if self.cfg.background_fetch:
                background_fetch(layer, stop, idle_s=self.cfg.background_idle_seconds)

        if wait:
            build()
        else:
            threading.Thread(target=build, daemon=True, name=f"layer-{sid}").start()

    def detach(self, sid: int) -> None:
        stop = self._stops.pop(sid, None)
        if stop:
            stop.set()
        self.tree.remove(str(sid))
        with self._lock:
            self._served.pop(sid, None)
        self.unavailable.pop(sid, None)

    def restore(self, sid: int, remote: dict) -> bool:
        """After a restart: open the layer from its kept TOC (the registry only for what is not kept)."""
        try:
            source = LayerSource.from_json(remote)
        except LabelError as e:
            self.unavailable[sid] = f"the metadata store's record is not usable: {e}"
            log.error("snapshot %d: %s", sid, self.unavailable[sid])
            return False
        try:
            fetched = self.fetch_verified(source)
        except FALLBACK_ERRORS as e:
            self.unavailable[sid] = f"layer {source.digest} of {source.reference}: {e}"
            log.warning("snapshot %d unavailable until its registry answers: %s", sid, self.unavailable[sid])
            return False
        self.attach(sid, fetched)
        return True

    def usage(self, sid: int) -> tuple[int, int]:
        """(bytes, inodes) of a lazy layer's files, as if unpacked (0, 0 while it is being built)."""
        layer = self.tree.built().get(str(sid))
        return layer.unpacked_usage() if layer is not None else (0, 0)

    def _write_chunk_list(self, layer: LazyLayer) -> None:
        path = os.path.join(self._toc_dir(layer.stats.digest), "chunks")
        if os.path.exists(path):
            return
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                f.write("\n".join(sorted(layer.chunk_keys())))
            os.replace(tmp, path)
        except OSError as e:  # a full disk: the layer still serves; Cleanup then leaves its chunks to the LRU
            log.warning("cannot keep the chunk list of layer %s (%s); its chunks are freed by the cache's LRU "
                        "instead of at its removal", layer.stats.digest, e.strerror or e)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def cleanup(self, live_digests: set[str]) -> int:
        """Free what only removed layers used: their kept TOC and their chunks (chunks that a live layer
        shares stay); then trim the cache to its limit. Returns the bytes freed.

        Nothing is deleted by a name that was not checked: only ROOT/tocs/sha256-<hex> directories
        (anything else there is left and reported), and only chunks whose listed key is an exact digest."""
        def chunks_of(d: str) -> set[str]:
            path = os.path.join(self.tocs, d, "chunks")
            try:
                with open(path) as f:
                    listed = f.read().split()
            except OSError:
                return set()
            bad = [k for k in listed if not is_digest(k)]
            if bad:
                log.warning("cleanup: %s lists %d key(s) that are not digests (first %r); they are ignored",
                            path, len(bad), bad[0][:100])
            return {k for k in listed if is_digest(k)}

        names = []
        for d in os.listdir(self.tocs) if os.path.isdir(self.tocs) else []:
            if _KEPT_RE.fullmatch(d) and not os.path.islink(os.path.join(self.tocs, d)):
                names.append(d)
            else:
                log.warning("cleanup: %s is not a kept TOC this snapshotter made; left alone",
                            os.path.join(self.tocs, d))
        live_names = {"sha256-" + digest_hex(d) for d in live_digests if is_digest(d)}
        keep: set[str] = set()
        for d in names:
            if d in live_names:
                keep |= chunks_of(d)
        freed = 0
        for d in names:
            if d in live_names:
                continue
            for digest in chunks_of(d) - keep:
                freed += self.cache.discard(digest)
            shutil.rmtree(os.path.join(self.tocs, d), ignore_errors=True)
        self.cache.evict_if_over()
        return freed

    def stats(self) -> dict:
        return {name: layer.stats.to_json() for name, layer in self.tree.built().items()}
