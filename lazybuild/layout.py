"""Images on disk: OCI image layouts (`oci:DIR[:TAG]`) and `docker save` archives (`docker-archive:FILE`).

Every blob is written under a temporary name and renamed into `blobs/sha256/` only once its digest
checked, and `index.json` is replaced atomically, so an interrupted pull leaves a valid layout.

A layout or an archive may come from someone else, so what they say is input: every digest in
index.json and the indexes below it is checked where it is read (`Descriptor`), a digest becomes a
path only as `blobs/sha256/<checked hex>`, and nothing in the layout is followed out of it: `blobs`
and `blobs/sha256` must be real directories, and index.json and blobs are opened without following
symlinks. JSON documents are capped (manifests, configs) before they are read whole. An archive's
manifest.json names members of the archive, which are only ever read from the tar, never taken as
host paths.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from typing import BinaryIO, Callable

from .digest import digest_hex
from .errors import DataError
from .image import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    REF_NAME_ANNOTATION,
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
    check_digest,
    parse_manifest_or_index,
    sha256_digest,
    size_text,
)

# Indexes may point at indexes (a multi-platform image inside a layout's index.json is two levels);
# past this depth it is a loop or a trap, not an image.
MAX_INDEX_DEPTH = 4


class LayoutError(DataError):
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
            if not os.path.lexists(os.path.join(root, "oci-layout")):
                write_atomic(os.path.join(root, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
            if not os.path.lexists(os.path.join(root, "index.json")):
                write_atomic(os.path.join(root, "index.json"), Index.build([]).raw)
        elif not os.path.exists(os.path.join(root, "oci-layout")):
            raise LayoutError(f"{root}: not an OCI image layout (no oci-layout file)")
        # A symlinked blobs/ or blobs/sha256 would lead our reads and writes out of the layout.
        for sub in ("blobs", os.path.join("blobs", "sha256")):
            path = os.path.join(root, sub)
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                raise LayoutError(f"{root}: {sub} is a symlink or not a directory; an OCI layout keeps its blobs "
                                  "in real directories (refusing to follow it out of the layout)")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest_hex(check_digest(digest, f"{self.root}: blob digest")))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest)) and not os.path.islink(self.blob_path(digest))

    def _open(self, path: str, what: str) -> BinaryIO:
        """A regular file of the layout, opened without following a symlink (it could point at a host file)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise LayoutError(f"{self.root}: {what} is missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LayoutError(f"{self.root}: {what} is a symlink; a layout's files are regular files "
                                  "(refusing to follow it)") from None
            raise LayoutError(f"{self.root}: cannot open {what}: {e.strerror}") from None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise LayoutError(f"{self.root}: {what} is not a regular file")
        return f

    def open_blob(self, digest: str) -> BinaryIO:
        return self._open(self.blob_path(digest), f"blob {digest}")

    def read_blob(self, digest: str, cap: int | None = None, kind: str = "") -> bytes:
        """A blob in memory, digest checked. Manifests and indexes are read with `cap` MAX_MANIFEST_BYTES
        (kind "manifests"), configs with MAX_CONFIG_BYTES: refused before they are read whole."""
        with self.open_blob(digest) as f:
            size = os.fstat(f.fileno()).st_size
            if cap is not None and size > cap:
                raise LayoutError(f"{self.root}: blob {digest} is {size} bytes, over the {size_text(cap)} cap for {kind}")
            data = f.read() if cap is None else f.read(cap + 1)
        if (cap is not None and len(data) > cap) or sha256_digest(data) != digest:
            raise LayoutError(f"{self.root}: blob {digest} is corrupt (its content has another digest)")
        return data

    def write_blob(self, digest: str, fill: Callable[[BinaryIO], None]) -> None:
        """`fill(f)` writes the blob; it lands under its name only if its digest is `digest`."""
        path = self.blob_path(digest)
        if self.has_blob(digest):
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
            os.replace(tmp, path)  # replaces a symlink someone left there, never writes through it
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def adopt_blob(self, digest: str, path: str) -> None:
        """Move a file whose content the caller has checked against `digest` into the layout."""
        target = self.blob_path(digest)
        if self.has_blob(digest):
            os.unlink(path)
            return
        os.chmod(path, 0o644)
        os.replace(path, target)

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.write_blob(digest, lambda f: f.write(data))
        return digest

    def index(self) -> Index:
        with self._open(os.path.join(self.root, "index.json"), "index.json") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise LayoutError(f"{self.root}: index.json is over the {size_text(MAX_MANIFEST_BYTES)} cap for indexes")
        try:
            return Index.parse(raw)
        except ValueError as e:  # InvalidDigest included: an entry naming no blob at all
            raise LayoutError(f"{self.root}: index.json: {e}") from None

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
        return self._manifests(desc, platform, all_platforms, 0)

    def _manifests(self, desc: Descriptor, platform: Platform | None, all_platforms: bool, depth: int
                   ) -> list[tuple[Manifest, Platform | None]]:
        try:
            doc = parse_manifest_or_index(self.read_blob(desc.digest, MAX_MANIFEST_BYTES, "manifests"), desc.media_type)
        except ValueError as e:  # a bad descriptor inside (digest, size, types): name the document
            raise LayoutError(f"{self.root}: {desc.digest}: {e}") from None
        if isinstance(doc, Manifest):
            return [(doc, desc.platform)]
        if depth >= MAX_INDEX_DEPTH:
            raise LayoutError(f"{self.root}: index {desc.digest} is nested more than {MAX_INDEX_DEPTH} indexes deep")
        if all_platforms:
            chosen = doc.manifests
        else:
            try:
                chosen = [doc.select(platform or Platform.host())]
            except LookupError as e:
                raise LayoutError(f"{self.root}: {e}") from None
        out = []
        for d in chosen:
            if all_platforms and d.media_type in INDEX_TYPES:
                continue  # as from a registry: nested indexes under a multi-platform copy are not images
            out += self._manifests(d, platform, all_platforms, depth + 1)
        return out


class DockerArchive:
    """A `docker save` tarball: manifest.json naming a config and layer tars by their member names."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
        except (OSError, tarfile.TarError) as e:
            raise LayoutError(f"{path}: not a docker save archive ({e})") from None
        try:
            raw = self._read("manifest.json", MAX_MANIFEST_BYTES, "manifests")
            entries = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise LayoutError(f"{path}: manifest.json is not JSON ({str(e)[:200]})") from None
        except LayoutError as e:
            raise LayoutError(f"{e}; not a docker save archive") from None
        if not isinstance(entries, list) or not entries or not all(_archive_entry_ok(e) for e in entries):
            raise LayoutError(f"{path}: manifest.json is not a list of {{Config, Layers, RepoTags}} entries with "
                              "member names as strings")
        self.entries = entries

    def manifests_for(self, tag: str = "") -> list[tuple[Manifest, dict[str, str], Platform | None]]:
        """One Docker schema2 manifest built from the archive, and which member holds each of its blobs.
        Digests are computed here from the bytes; the member names are only ever looked up in the tar."""
        entry = self.entries[0]
        if tag:
            matches = [e for e in self.entries if any(t == tag or t.endswith("/" + tag) for t in e.get("RepoTags") or [])]
            if not matches:
                raise LayoutError(f"{self.path}: no image tagged {tag!r}")
            entry = matches[0]
        paths: dict[str, str] = {}
        config_raw = self._read(entry["Config"], MAX_CONFIG_BYTES, "configs")
        config = Descriptor(DOCKER_CONFIG, sha256_digest(config_raw), len(config_raw))
        paths[config.digest] = entry["Config"]
        layers = []
        for layer_path in entry["Layers"]:
            h, size = hashlib.sha256(), 0
            with self.open_member(layer_path) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    size += len(block)
            digest = "sha256:" + h.hexdigest()
            paths[digest] = layer_path
            layers.append(Descriptor(DOCKER_LAYER, digest, size))
        manifest = Manifest.build(config, layers, media_type=DOCKER_MANIFEST)
        try:
            cfg = json.loads(config_raw)
            plat = Platform(cfg.get("os", "linux"), cfg.get("architecture", "amd64"), cfg.get("variant", ""))
        except (ValueError, RecursionError, AttributeError):
            raise LayoutError(f"{self.path}: config {entry['Config']!r} is not a JSON object") from None
        return [(manifest, paths, plat)]

    def _member(self, name: str) -> tarfile.TarInfo:
        """A regular-file member of the archive (a link member, even to another member, is refused)."""
        try:
            info = self.tar.getmember(name)
        except KeyError:
            raise LayoutError(f"{self.path}: {name!r} is not in the archive") from None
        except (OSError, tarfile.TarError) as e:
            raise LayoutError(f"{self.path}: cannot read the archive ({e})") from None
        if not info.isreg() or info.size < 0:
            raise LayoutError(f"{self.path}: member {name!r} is not a regular file")
        return info

    def open_member(self, name: str) -> BinaryIO:
        f = self.tar.extractfile(self._member(name))
        assert f is not None  # a regular file always has a reader
        return f

    def _read(self, name: str, cap: int, kind: str) -> bytes:
        info = self._member(name)
        if info.size > cap:
            raise LayoutError(f"{self.path}: member {name!r} is {info.size} bytes, over the {size_text(cap)} cap for {kind}")
        with self.tar.extractfile(info) as f:
            return f.read(cap)


def _archive_entry_ok(e: object) -> bool:
    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    return (isinstance(e, dict) and isinstance(e.get("Config"), str) and strings(e.get("Layers"))
            and (e.get("RepoTags") is None or strings(e.get("RepoTags"))))


def manifest_json(manifest: Manifest) -> dict:
    return json.loads(manifest.raw)


__all__ = ["DockerArchive", "LayoutError", "OCILayout", "canonical_json", "write_atomic"]
