"""Copy and convert images between registries, OCI layouts and docker-archive tarballs.

`lazybuild pull`, `push` and `convert` are all one loop: for each chosen platform's manifest, bring
the config and every layer from the source to the destination, optionally turning each layer into
eStargz/zstd on the way (then diff_ids, media types and annotations follow), and record the result
(a tag in the registry, an entry in index.json).

Sources are input from strangers: every digest comes checked out of the image model (`Descriptor`),
every blob is verified against its digest while it is copied, configs are capped before they are
read into memory, and a fetched blob is named (adopted by the destination) only once verified.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .digest import digest_hex
from .errors import DataError, InputError
from .image import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
    is_layer,
    parse_manifest_or_index,
    sha256_digest,
    size_text,
)
from .layout import DockerArchive, LayoutError, OCILayout
from .registry import Reference, Registry, RegistryError


class TransferError(DataError):
    pass


@dataclass
class Location:
    kind: str  # registry | oci | docker-archive
    ref: Reference | None = None
    path: str = ""
    tag: str = ""

    @classmethod
    def parse(cls, text: str) -> "Location":
        if text.startswith("oci:"):
            path, _, tag = text[4:].partition(":")
            if not path:
                raise InputError(f"{text!r}: oci: needs a directory (oci:DIR[:TAG])")
            return cls("oci", path=path, tag=tag)
        if text.startswith("docker-archive:"):
            path, _, tag = text[len("docker-archive:"):].partition(":")
            return cls("docker-archive", path=path, tag=tag)
        if text.startswith("docker://"):
            text = text[len("docker://"):]
        return cls("registry", ref=Reference.parse(text))

    def __str__(self) -> str:
        if self.kind == "registry":
            return str(self.ref)
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "")


# --- sources --------------------------------------------------------------------------------------------


class Source(abc.ABC):
    """Reads one image: its manifests (per platform) and their blobs, every blob verified."""

    @abc.abstractmethod
    def manifests(self, platform: Platform | None, all_platforms: bool) -> list[tuple[Manifest, Platform | None]]:
        """The image manifest of each chosen platform (platform None when the source has a single manifest)."""

    @abc.abstractmethod
    def fetch(self, desc: Descriptor, out: BinaryIO, progress=None) -> None:
        """Write the blob into `out`, raising rather than leaving bytes that do not match its digest."""

    def read(self, desc: Descriptor) -> bytes:
        """A config, in memory: capped at MAX_CONFIG_BYTES before anything is read."""
        _check_config_size(desc)
        with tempfile.TemporaryFile() as f:
            self.fetch(desc, f)
            f.seek(0)
            return f.read(MAX_CONFIG_BYTES)

    def registry_ref(self) -> Reference | None:
        """The registry reference the blobs come from, if they come from one (a registry destination on
        the same host mounts them from there instead of uploading them)."""
        return None

    def close(self) -> None:
        pass


class RegistrySource(Source):
    def __init__(self, ref: Reference, insecure: bool = False):
        self.ref = ref
        self.registry = Registry(ref.host, insecure=insecure)

    def manifests(self, platform, all_platforms):
        raw, media_type = self.registry.get_manifest(self.ref)
        try:
            doc = parse_manifest_or_index(raw, media_type)
            if isinstance(doc, Manifest):
                return [(doc, None)]
            chosen = doc.manifests if all_platforms else [doc.select(platform or Platform.host())]
        except (ValueError, LookupError) as e:  # a bad digest or size inside, or no such platform
            raise TransferError(f"{self.ref}: {e}") from None
        out = []
        for d in chosen:
            raw, mt = self.registry.get_manifest(self.ref.with_digest(d.digest))
            if (mt or d.media_type) in INDEX_TYPES:
                continue  # nested indexes (attestations and the like) are not images
            try:
                out.append((Manifest.parse(raw, mt or d.media_type), d.platform))
            except ValueError as e:
                raise TransferError(f"{self.ref}: manifest {d.digest}: {e}") from None
        return out

    def fetch(self, desc, out, progress=None):
        # The descriptor's size bounds the download: a registry sending more is cut off there.
        self.registry.fetch_blob(self.ref.repository, desc.digest, out, progress, size=desc.size)

    def read(self, desc):
        _check_config_size(desc)
        return self.registry.read_blob(self.ref.repository, desc.digest, size=desc.size)

    def registry_ref(self):
        return self.ref

    def close(self):
        self.registry.close()


class OCISource(Source):
    def __init__(self, path: str, tag: str):
        self.layout, self.tag = OCILayout(path), tag

    def manifests(self, platform, all_platforms):
        return self.layout.manifests_for(self.tag, platform, all_platforms)

    def fetch(self, desc, out, progress=None):
        with self.layout.open_blob(desc.digest) as f:
            _copy_verified(f, out, desc, f"{self.layout.root}: blob {desc.digest}")

    def read(self, desc):
        _check_config_size(desc)
        return self.layout.read_blob(desc.digest, MAX_CONFIG_BYTES, "configs")


class KeptBlobsSource(Source):
    """SOURCE, with each blob it fetches kept in a local OCI layout (the build's state dir) and read from
    there the next time: a rebuild written to an OCI layout or tar copies a base image's layers from disk
    instead of downloading them again, as BuildKit's content store does. A kept blob is verified as it is
    copied out, like any layout's; one that no longer matches is dropped and fetched again."""

    def __init__(self, source: Source, directory: str):
        self.source = source
        self.layout = OCILayout(directory, create=True)

    def manifests(self, platform, all_platforms):
        return self.source.manifests(platform, all_platforms)

    def fetch(self, desc, out, progress=None):
        for attempt in range(2):
            if not self.layout.has_blob(desc.digest):
                self._keep(desc, progress)
            start = out.tell()
            try:
                with self.layout.open_blob(desc.digest) as f:
                    _copy_verified(f, out, desc, f"{self.layout.root}: kept blob {desc.digest}")
                return
            except TransferError:
                if attempt:
                    raise
                os.unlink(self.layout.blob_path(desc.digest))
                out.seek(start)
                out.truncate()

    def _keep(self, desc: Descriptor, progress) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=self.layout.root)
        try:
            with os.fdopen(fd, "wb") as f:
                self.source.fetch(desc, f, progress)  # verified against the digest while it arrives
            self.layout.adopt_blob(desc.digest, tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, desc):
        return self.source.read(desc)

    def registry_ref(self):
        return self.source.registry_ref()

    def close(self):
        self.source.close()


class ArchiveSource(Source):
    def __init__(self, path: str, tag: str):
        self.archive, self.tag = DockerArchive(path), tag
        self.paths: dict[str, str] = {}

    def manifests(self, platform, all_platforms):
        out = []
        for manifest, paths, plat in self.archive.manifests_for(self.tag):
            self.paths.update(paths)
            out.append((manifest, plat))
        return out

    def fetch(self, desc, out, progress=None):
        # The digest was computed from this member when the manifest was made; the archive may have
        # changed since, so the bytes are checked again as they are copied.
        with self.archive.open_member(self.paths[desc.digest]) as f:
            _copy_verified(f, out, desc, f"{self.archive.path}: member {self.paths[desc.digest]!r}")


def _check_config_size(desc: Descriptor) -> None:
    if desc.size > MAX_CONFIG_BYTES:
        raise TransferError(f"config {desc.digest}: its descriptor says {desc.size} bytes, over the "
                            f"{size_text(MAX_CONFIG_BYTES)} cap for configs")


def _copy_verified(src: BinaryIO, out: BinaryIO, desc: Descriptor, what: str) -> None:
    """Copy SRC into OUT checking DESC's digest; on a mismatch OUT is left as it was and nothing is named."""
    start = out.tell()
    h = hashlib.sha256()
    for block in iter(lambda: src.read(1 << 20), b""):
        out.write(block)
        h.update(block)
    if "sha256:" + h.hexdigest() != desc.digest:
        out.seek(start)
        out.truncate()
        raise TransferError(f"{what} has digest sha256:{h.hexdigest()}, not {desc.digest} (corrupt or changed)")


def open_source(loc: Location, insecure: bool = False) -> Source:
    if loc.kind == "registry":
        return RegistrySource(loc.ref, insecure)
    if loc.kind == "oci":
        return OCISource(loc.path, loc.tag)
    return ArchiveSource(loc.path, loc.tag)


# --- destinations ---------------------------------------------------------------------------------------


class Dest(abc.ABC):
    staging_dir: str | None = None  # where blobs are staged: on the destination's filesystem when it has one

    @abc.abstractmethod
    def put_blob(self, desc: Descriptor, path: str) -> str:
        """Store the blob whose bytes (already checked against desc.digest) are in the file `path`;
        the file is the destination's to keep or drop. Returns what happened, for logs
        ("uploaded", "exists", "stored", ...)."""

    def put_blob_from(self, desc: Descriptor, src: Source, progress=None) -> str:
        """Store a blob that `src` holds, fetching it (verified, under a temporary name) only when the
        destination has no cheaper way to get it. Returns what happened, as put_blob does."""
        fd, path = tempfile.mkstemp(prefix=".fetch-", dir=self.staging_dir)
        try:
            with os.fdopen(fd, "w+b") as f:
                src.fetch(desc, f, progress)
            return self.put_blob(desc, path)
        finally:
            if os.path.exists(path):
                os.unlink(path)

    @abc.abstractmethod
    def put_manifest(self, manifest: Manifest) -> None:
        """Store a manifest by digest (its blobs are already there)."""

    @abc.abstractmethod
    def finish(self, images: list[tuple[Manifest, Platform | None]]) -> str:
        """Tag/record the result; returns the digest users refer to (manifest, or index for several)."""

    def close(self) -> None:
        pass


class RegistryDest(Dest):
    def __init__(self, ref: Reference, insecure: bool = False, mount_from: str | None = None):
        self.ref, self.mount_from = ref, mount_from
        self.registry = Registry(ref.host, insecure=insecure)

    def put_blob(self, desc, path):
        return self.registry.push_blob(self.ref.repository, desc.digest, desc.size, lambda: open(path, "rb"),
                                       mount_from=self.mount_from)

    def put_blob_from(self, desc, src, progress=None):
        # A blob already in the repository is left alone, one in another repository of the same registry
        # is mounted from there (cross-repository mount): neither is downloaded. Only an upload fetches it.
        mount_from = self.mount_from
        origin = src.registry_ref()
        if origin is not None and origin.host == self.ref.host:
            mount_from = origin.repository

        def fetched() -> BinaryIO:
            f = tempfile.TemporaryFile(dir=self.staging_dir)
            src.fetch(desc, f, progress)
            f.seek(0)
            return f

        return self.registry.push_blob(self.ref.repository, desc.digest, desc.size, fetched, mount_from=mount_from)

    def put_manifest(self, manifest):
        self.registry.put_manifest(self.ref.repository, manifest.digest, manifest.raw, manifest.media_type)

    def finish(self, images):
        tag = self.ref.tag or "latest"
        if len(images) == 1:
            m = images[0][0]
            return self.registry.put_manifest(self.ref.repository, tag, m.raw, m.media_type)
        index = Index.build([m.descriptor(p) for m, p in images])
        return self.registry.put_manifest(self.ref.repository, tag, index.raw, OCI_INDEX)

    def close(self):
        self.registry.close()


class OCIDest(Dest):
    def __init__(self, path: str, tag: str):
        self.layout, self.tag = OCILayout(path, create=True), tag or "latest"
        self.staging_dir = self.layout.root  # staged beside the blobs, so adopting one is a rename

    def put_blob(self, desc, path):
        existed = self.layout.has_blob(desc.digest)
        self.layout.adopt_blob(desc.digest, path)  # drops the file when the layout has the blob already
        return "exists" if existed else "stored"

    def put_blob_from(self, desc, src, progress=None):
        if self.layout.has_blob(desc.digest):  # layouts written again keep their blobs: no second fetch
            return "exists"
        return super().put_blob_from(desc, src, progress)

    def put_manifest(self, manifest):
        self.layout.put_bytes(manifest.raw)

    def finish(self, images):
        if len(images) == 1:
            m, p = images[0]
            self.layout.add_to_index(m.descriptor(p), self.tag)
            return m.digest
        index = Index.build([m.descriptor(p) for m, p in images])
        self.layout.put_bytes(index.raw)
        self.layout.add_to_index(Descriptor(OCI_INDEX, index.digest, len(index.raw)), self.tag)
        return index.digest


class OCIArchiveDest(OCIDest):
    """An OCI image layout as one tar file (what `docker buildx build --output type=oci` writes). The layout
    is made in a temporary directory beside the file and tarred, under a temporary name, by finish()."""

    def __init__(self, path: str, tag: str):
        self.path = path
        self.work = tempfile.mkdtemp(prefix=".lazybuild-oci-", dir=os.path.dirname(os.path.abspath(path)))
        super().__init__(self.work, tag)

    def finish(self, images):
        digest = super().finish(images)
        fd, tmp = tempfile.mkstemp(prefix=".lazybuild-", suffix=".partial", dir=os.path.dirname(os.path.abspath(self.path)))
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tf:
                for name in sorted(os.listdir(self.work)):
                    tf.add(os.path.join(self.work, name), name)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)


class ArchiveDest(Dest):
    """A `docker save`-style tarball (what `docker load` reads). It holds one image and no annotations;
    layers are stored as they are (docker load and skopeo accept compressed ones)."""

    def __init__(self, path: str, tag: str):
        self.path, self.tag = path, tag
        self.staging_dir = os.path.dirname(os.path.abspath(path))
        self.blobs = tempfile.mkdtemp(prefix=".lazybuild-archive-", dir=self.staging_dir)

    def put_blob(self, desc, path):
        os.replace(path, os.path.join(self.blobs, digest_hex(desc.digest)))
        return "stored"

    def put_manifest(self, manifest):
        pass  # the archive's manifest.json is written by finish()

    def finish(self, images):
        if len(images) != 1:
            raise TransferError(f"{self.path}: a docker archive holds one image; choose one with --platform")
        manifest = images[0][0]
        hexof = lambda d: digest_hex(d.digest)
        entry = {"Config": hexof(manifest.config) + ".json", "RepoTags": [self.tag] if self.tag else [],
                 "Layers": [hexof(layer) + "/layer.tar" for layer in manifest.layers]}
        tmp = self.path + ".partial"
        try:
            with tarfile.open(tmp, "w") as tf:
                tf.add(os.path.join(self.blobs, hexof(manifest.config)), entry["Config"])
                for layer, name in zip(manifest.layers, entry["Layers"]):
                    tf.add(os.path.join(self.blobs, hexof(layer)), name)
                data = json.dumps([entry]).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return manifest.digest

    def close(self):
        shutil.rmtree(self.blobs, ignore_errors=True)


def open_dest(loc: Location, insecure: bool = False, mount_from: str | None = None) -> Dest:
    if loc.kind == "registry":
        return RegistryDest(loc.ref, insecure, mount_from)
    if loc.kind == "oci":
        return OCIDest(loc.path, loc.tag)
    return ArchiveDest(loc.path, loc.tag)


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class ConvertOptions:
    compression: str = "gzip"  # gzip (eStargz) | zstd (eStargz with zstd)
    chunk_size: int = 4 << 20
    prioritized_files: list[str] | None = None
    force: bool = False


def copy_image(src: Source, dst: Dest, *, platform: Platform | None = None, all_platforms: bool = False,
               convert: ConvertOptions | None = None, log: Callable[[str], None] = lambda s: None,
               layer_progress: Callable[[str], Callable] | None = None) -> str:
    """Copy (and with `convert`, turn into eStargz) the image; returns the digest of what was recorded."""
    if convert is not None:
        from . import estargz  # only conversions pay for the compressors' import
    images = []
    with tempfile.TemporaryDirectory(prefix=".lazybuild-copy-", dir=dst.staging_dir) as tmp:
        for manifest, plat in src.manifests(platform, all_platforms):
            config_raw = src.read(manifest.config)
            layers, diff_ids, changed = [], [], False
            for i, layer in enumerate(manifest.layers):
                if not is_layer(layer.media_type):
                    raise TransferError(f"layer {i} of {manifest.digest} has media type {layer.media_type!r}")
                label = f"layer {i + 1}/{len(manifest.layers)}"
                fetch_progress = _counting(layer_progress(f"{label} fetch") if layer_progress else None, layer.size)
                if convert is not None and (convert.force or estargz.TOC_DIGEST_ANNOTATION not in layer.annotations):
                    # A temporary name until the source has verified every byte; the destination names it.
                    fd, path = tempfile.mkstemp(prefix=".fetch-", dir=tmp)
                    with os.fdopen(fd, "w+b") as f:
                        src.fetch(layer, f, fetch_progress)
                    out = path + ".esgz"
                    blob = estargz.convert_file(path, out, compression=convert.compression, chunk_size=convert.chunk_size,
                                                prioritized_files=convert.prioritized_files or [],
                                                allow_prioritized_not_found=True,
                                                progress=layer_progress(f"{label} convert") if layer_progress else None)
                    os.unlink(path)
                    path = out
                    layer = Descriptor(blob.media_type, blob.digest, blob.size, dict(blob.annotations))
                    diff_ids.append(blob.diff_id)
                    changed = True
                    log(f"layer {i + 1}/{len(manifest.layers)}: {blob.digest} ({blob.size} bytes, TOC {blob.toc_digest})")
                    dst.put_blob(layer, path)
                    if os.path.exists(path):
                        os.unlink(path)
                else:  # as it is: the destination fetches it only if it has no cheaper way (exists, mount)
                    diff_ids.append(None)
                    dst.put_blob_from(layer, src, fetch_progress)
                layers.append(layer)
            if changed:
                config = json.loads(config_raw)
                old = config.get("rootfs", {}).get("diff_ids", [])
                if len(old) != len(diff_ids):
                    raise TransferError(f"config of {manifest.digest} lists {len(old)} diff_ids for {len(diff_ids)} layers")
                config["rootfs"]["diff_ids"] = [new or prev for new, prev in zip(diff_ids, old)]
                config_raw = canonical_json(config)
                layers = [as_oci_layer(d) for d in layers]
                config_desc = Descriptor(OCI_CONFIG, sha256_digest(config_raw), len(config_raw))
                manifest = Manifest.build(config_desc, layers, manifest.annotations or None, OCI_MANIFEST)
            cfg_path = os.path.join(tmp, "config")
            with open(cfg_path, "wb") as f:
                f.write(config_raw)
            dst.put_blob(manifest.config, cfg_path)
            dst.put_manifest(manifest)
            images.append((manifest, plat))
        if not images:
            raise TransferError("the source has no image for the platforms asked for")
        return dst.finish(images)


def _counting(update: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    """Adapt a (done, total) progress display to the (bytes just moved) callbacks of downloads."""
    if update is None:
        return None
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        update(done, total)

    return add


def as_oci_layer(d: Descriptor) -> Descriptor:
    """Docker media types become OCI ones (layer annotations need an OCI manifest); the bytes are the same."""
    mt = {
        "application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    }.get(d.media_type, d.media_type)
    if mt == "application/vnd.oci.image.layer.v1.tar+zstd":
        mt = OCI_LAYER_ZSTD
    return Descriptor(mt, d.digest, d.size, d.annotations, d.platform, d.urls)


__all__ = ["ConvertOptions", "Dest", "Location", "OCIArchiveDest", "OCIDest", "RegistryDest", "Source",
           "TransferError", "as_oci_layer", "copy_image", "open_dest", "open_source", "RegistryError", "LayoutError"]
