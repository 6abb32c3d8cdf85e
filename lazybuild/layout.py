"""Images on disk: OCI image layouts (`oci:DIR[:TAG]`) and `docker save` archives (`docker-archive:FILE`).

Every blob is written under a temporary name and renamed into `blobs/sha256/` only once its digest
checked, and `index.json` is replaced atomically, so an interrupted pull leaves a valid layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from typing import BinaryIO, Callable

from .image import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
    check_digest,
    parse_manifest_or_index,
    sha256_digest,
)


class LayoutError(Exception):
    pass


def write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class OCILayout:
    """An OCI image layout directory."""

    def __init__(self, root: str, create: bool = False):
        self.root = root
        if create:
            os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
            if not os.path.exists(os.path.join(root, "oci-layout")):
                write_atomic(os.path.join(root, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
            if not os.path.exists(os.path.join(root, "index.json")):
                write_atomic(os.path.join(root, "index.json"), Index.build([]).raw)
        elif not os.path.exists(os.path.join(root, "oci-layout")):
            raise LayoutError(f"{root}: not an OCI image layout (no oci-layout file)")

    def blob_path(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.root, "blobs", "sha256", digest.split(":", 1)[1])

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise LayoutError(f"{self.root}: blob {digest} is missing") from None

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read()
        if sha256_digest(data) != digest:
            raise LayoutError(f"{self.root}: blob {digest} is corrupt (its content has another digest)")
        return data

    def write_blob(self, digest: str, fill: Callable[[BinaryIO], None]) -> None:
        """`fill(f)` writes the blob; it lands under its name only if its digest is `digest`."""
        path = self.blob_path(digest)
        if os.path.exists(path):
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w+b") as f:
                fill(f)
                f.seek(0)
                h = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if "sha256:" + h.hexdigest() != digest:
                raise LayoutError(f"blob written as {digest} has digest sha256:{h.hexdigest()}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def adopt_blob(self, digest: str, path: str) -> None:
        """Move a file whose content the caller has checked against `digest` into the layout."""
        target = self.blob_path(digest)
        if os.path.exists(target):
            os.unlink(path)
            return
        os.chmod(path, 0o644)
        os.replace(path, target)

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.write_blob(digest, lambda f: f.write(data))
        return digest

    def index(self) -> Index:
        with open(os.path.join(self.root, "index.json"), "rb") as f:
            return Index.parse(f.read())

    def resolve(self, tag: str = "") -> Descriptor:
        """The index entry for `tag` (annotation org.opencontainers.image.ref.name), or the only one."""
        entries = self.index().manifests
        if tag:
            for d in entries:
                if d.annotations.get(REF_NAME_ANNOTATION) == tag:
                    return d
            raise LayoutError(f"{self.root}: no image tagged {tag!r}")
        if len(entries) != 1:
            tags = [d.annotations.get(REF_NAME_ANNOTATION, d.digest) for d in entries]
            raise LayoutError(f"{self.root}: {len(entries)} images ({', '.join(tags) or 'none'}); say which as oci:DIR:TAG")
        return entries[0]

    def add_to_index(self, desc: Descriptor, tag: str = "") -> None:
        """Record `desc` in index.json (replacing the entry with the same tag)."""
        entries = [d for d in self.index().manifests if not tag or d.annotations.get(REF_NAME_ANNOTATION) != tag]
        if tag:
            desc = Descriptor(desc.media_type, desc.digest, desc.size, {**desc.annotations, REF_NAME_ANNOTATION: tag},
                              desc.platform)
        entries = [d for d in entries if d.digest != desc.digest or d.annotations != desc.annotations]
        write_atomic(os.path.join(self.root, "index.json"), Index.build(entries + [desc]).raw)

    def manifests_for(self, tag: str = "", platform: Platform | None = None, all_platforms: bool = False
                      ) -> list[tuple[Manifest, Platform | None]]:
        desc = self.resolve(tag)
        doc = parse_manifest_or_index(self.read_blob(desc.digest), desc.media_type)
        if isinstance(doc, Manifest):
            return [(doc, desc.platform)]
        chosen = doc.manifests if all_platforms else [doc.select(platform or Platform.host())]
        return [(Manifest.parse(self.read_blob(d.digest), d.media_type), d.platform) for d in chosen]


class DockerArchive:
    """A `docker save` tarball: manifest.json naming a config and layer tars by path."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
            with self.tar.extractfile("manifest.json") as f:
                entries = json.load(f)
        except (OSError, tarfile.TarError, KeyError, ValueError) as e:
            raise LayoutError(f"{path}: not a docker save archive ({e})") from None
        self.entries = entries

    def manifests_for(self, tag: str = "") -> list[tuple[Manifest, dict[str, str], Platform | None]]:
        """One Docker schema2 manifest built from the archive, and where each of its blobs lies in the tar."""
        entry = self.entries[0]
        if tag:
            matches = [e for e in self.entries if any(t == tag or t.endswith("/" + tag) for t in e.get("RepoTags") or [])]
            if not matches:
                raise LayoutError(f"{self.path}: no image tagged {tag!r}")
            entry = matches[0]
        paths: dict[str, str] = {}
        config_raw = self._read(entry["Config"])
        config = Descriptor(DOCKER_CONFIG, sha256_digest(config_raw), len(config_raw))
        paths[config.digest] = entry["Config"]
        layers = []
        for layer_path in entry["Layers"]:
            h, size = hashlib.sha256(), 0
            with self.tar.extractfile(layer_path) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    size += len(block)
            digest = "sha256:" + h.hexdigest()
            paths[digest] = layer_path
            layers.append(Descriptor(DOCKER_LAYER, digest, size))
        manifest = Manifest.build(config, layers, media_type=DOCKER_MANIFEST)
        cfg = json.loads(config_raw)
        return [(manifest, paths, Platform(cfg.get("os", "linux"), cfg.get("architecture", "amd64"), cfg.get("variant", "")))]

    def open_member(self, path: str) -> BinaryIO:
        f = self.tar.extractfile(path)
        if f is None:
            raise LayoutError(f"{self.path}: {path} is not a file")
        return f

    def _read(self, path: str) -> bytes:
        with self.open_member(path) as f:
            return f.read()


def manifest_json(manifest: Manifest) -> dict:
    return json.loads(manifest.raw)


__all__ = ["DockerArchive", "LayoutError", "OCILayout", "canonical_json", "write_atomic"]
