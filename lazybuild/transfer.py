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
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .digest import check_digest, digest_hex
from .errors import DataError, InputError
from .image import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
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
from .layout import DockerArchive, LayoutError, OCILayout, write_atomic
from .registry import Reference, Registry, RegistryError


class TransferError(DataError):
    pass


class LocationError(InputError):
    """An image argument that names no image we can read or write (exit 1, like any bad input)."""

    hint = ("an image is docker://HOST/REPO[:TAG|@DIGEST] (or HOST/REPO[:TAG] alone), oci:DIR[:TAG|@DIGEST], "
            "oci-archive:FILE.tar[:TAG], docker-archive:FILE.tar[:NAME:TAG] or dir:DIR")


# Where an image is, as skopeo and containers/image spell it: TRANSPORT:WHERE. A bare reference is docker://.
REGISTRY, OCI, OCI_ARCHIVE, DOCKER_ARCHIVE, DIR = "registry", "oci", "oci-archive", "docker-archive", "dir"
LOCAL_KINDS = (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE, DIR)
# Transports of skopeo/containers-image we do not read or write, with what to use instead.
_OTHER_TRANSPORTS = {
    "containers-storage": "lazybuild does not read podman's or CRI-O's image store; "
                          "`podman save --format oci-archive -o FILE IMAGE` then oci-archive:FILE",
    "docker-daemon": "lazybuild does not talk to dockerd; `docker save -o FILE IMAGE` then docker-archive:FILE",
    "ostree": "lazybuild does not read ostree repositories",
    "sif": "lazybuild does not read Singularity images",
    "tarball": "lazybuild does not read bare layer tarballs as images; `lazybuild layer convert` converts one layer",
}
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd")
_MAX_LOCATION_CHARS = 4096  # PATH_MAX: past it no path or reference names anything


@dataclass(frozen=True)
class Location:
    """An image's place: a registry reference, an OCI layout dir, an OCI layout tar, a docker-archive or a
    skopeo dir."""
    kind: str  # REGISTRY | OCI | OCI_ARCHIVE | DOCKER_ARCHIVE | DIR
    ref: Reference | None = None
    path: str = ""
    tag: str = ""  # OCI: the ref.name annotation; docker-archive: a RepoTags entry (NAME:TAG)
    digest: str = ""  # oci:DIR@DIGEST: an index.json entry by digest

    @property
    def is_registry(self) -> bool:
        return self.kind == REGISTRY

    @classmethod
    def parse(cls, text: str) -> "Location":
        """TEXT as one of the transports; a LocationError (an InputError) for anything else, naming what it
        looks like (a path without a transport is told to say oci:, an unknown transport is named)."""
        if not isinstance(text, str) or not text:
            raise LocationError("an image argument is empty")
        if len(text) > _MAX_LOCATION_CHARS or any(ord(c) < 32 or c == "\x7f" for c in text):
            raise LocationError(f"{_shown(text)}: an image argument has no control characters and at most "
                                f"{_MAX_LOCATION_CHARS} characters")
        scheme = _SCHEME_RE.match(text)
        if scheme:
            name = scheme.group(1)
            if name != "docker":
                raise LocationError(f"{_shown(text)}: {name}:// is not a transport lazybuild knows; "
                                    "the registry transport is docker://HOST/REPO[:TAG]")
            return cls(REGISTRY, ref=_reference(text[len("docker://"):], text))
        transport, colon, rest = text.partition(":")
        if colon and transport in LOCAL_KINDS:
            return cls._local(transport, rest, text)
        if colon and transport in _OTHER_TRANSPORTS:
            raise LocationError(f"{_shown(text)}: {transport}: is not supported: {_OTHER_TRANSPORTS[transport]}")
        if colon and transport == "docker":
            raise LocationError(f"{_shown(text)}: the registry transport is written docker://HOST/REPO[:TAG]")
        if _looks_like_path(text):
            raise LocationError(f"{_shown(text)} looks like a path, not a registry reference", hint=_path_hint(text))
        host = text.split("/", 1)[0]
        if colon and "/" in text and ":" in host and not host.startswith("[") and not host.rsplit(":", 1)[1].isdigit():
            # `foo:bar/baz`: not a host:port (the port is a number), so a transport we do not know.
            raise LocationError(f"{_shown(text)}: {transport}: is not a transport lazybuild knows")
        if colon and "/" not in text and not rest.replace(".", "").replace("-", "").replace("_", "").isalnum():
            # `foo:bar` with something no tag can be after the colon (`foo:/x`, `foo:a b`): a transport.
            raise LocationError(f"{_shown(text)}: {transport}: is not a transport lazybuild knows")
        try:
            return cls(REGISTRY, ref=_reference(text, text))
        except LocationError as e:
            if os.path.exists(text):  # `pull REF mydir`: a relative path that also spells a bad reference
                raise LocationError(f"{e}; {text!r} is also a path here", hint=_path_hint(text)) from None
            raise

    @classmethod
    def _local(cls, transport: str, rest: str, text: str) -> "Location":
        if transport == DIR:  # skopeo's dir:DIR: the rest is the path, colons and all; one image, no tag
            if not rest:
                raise LocationError(f"{_shown(text)}: dir: needs a directory (dir:DIR)")
            return cls(DIR, path=rest)
        digest = ""
        if transport == OCI and "@" in rest:
            rest, digest = rest.rsplit("@", 1)
            try:
                check_digest(digest, f"{_shown(text)}: the digest after @")
            except InputError as e:
                raise LocationError(str(e)) from None
        path, _, tag = rest.partition(":")  # as skopeo: the path ends at the first colon
        forms = {OCI: "oci:DIR[:TAG|@DIGEST]", OCI_ARCHIVE: "oci-archive:FILE[:TAG]",
                 DOCKER_ARCHIVE: "docker-archive:FILE[:NAME:TAG]"}
        if not path:
            raise LocationError(f"{_shown(text)}: {transport}: needs a path ({forms[transport]})")
        if tag and digest:
            raise LocationError(f"{_shown(text)}: give a tag or a digest, not both ({forms[transport]})")
        if transport != DOCKER_ARCHIVE and tag and not _OCI_TAG_RE.fullmatch(tag):
            raise LocationError(f"{_shown(text)}: {tag!r} is not a tag (letters, digits, and . _ - + / @ inside, "
                                "at most 128)")
        if transport == DOCKER_ARCHIVE and tag:
            _reference(tag, text)  # RepoTags entries are registry references (name:tag)
        return cls(transport, path=path, tag=tag, digest=digest)

    def __str__(self) -> str:
        if self.kind == REGISTRY:
            return str(self.ref)
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


# An OCI ref.name (image-spec annotations: alphanumerics with separators - . _ : @ / +), without the colon
# (oci:DIR:TAG ends the path at the first colon) and at most 128 characters, like a Docker tag.
_OCI_TAG_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._+/@-]{0,126}[A-Za-z0-9_])?")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


def registry_reference(text: str, what: str) -> Reference:
    """TEXT parsed as every image argument is (Location.parse), for a command that works on a registry image
    only (WHAT names it): a layout or archive is refused saying so."""
    loc = Location.parse(text)
    if not loc.is_registry:
        raise LocationError(f"{what} takes an image in a registry; {_shown(text)} is a local {loc.kind} image",
                            hint="push it to a registry first: lazybuild copy SRC HOST/REPO[:TAG]")
    return loc.ref


def _reference(text: str, original: str) -> Reference:
    try:
        return Reference.parse(text)
    except (InputError, ValueError, UnicodeError) as e:  # InvalidDigest is an InputError too
        raise LocationError(str(e) if original == text else f"{_shown(original)}: {e}") from None


def _looks_like_path(text: str) -> bool:
    return (text in (".", "..") or text.startswith(("/", "./", "../", "~"))
            or text.lower().endswith(_ARCHIVE_SUFFIXES))


def _path_hint(text: str) -> str:
    if text.lower().endswith(_ARCHIVE_SUFFIXES) or os.path.isfile(text):
        return (f"say which kind of tar it is: oci-archive:{text} (an OCI layout in a tar, as `docker buildx build "
                f"-o type=oci` writes) or docker-archive:{text} (as `docker save` writes)")
    return f"an OCI image layout directory is written oci:{text} (oci:DIR[:TAG])"


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
    def __init__(self, path: str, tag: str, digest: str = ""):
        self.layout, self.tag, self.digest = OCILayout(path), tag, digest

    def manifests(self, platform, all_platforms):
        if not self.digest:
            return self.layout.manifests_for(self.tag, platform, all_platforms)
        # oci:DIR@DIGEST: an entry of index.json by its digest (checked when the index was parsed)
        for desc in self.layout.index().manifests:
            if desc.digest == self.digest:
                return self.layout._manifests(desc, platform, all_platforms, 0)  # noqa: SLF001 - the same walk as by tag
        raise TransferError(f"{self.layout.root}: index.json lists no image with digest {self.digest}")

    def fetch(self, desc, out, progress=None):
        with self.layout.open_blob(desc.digest) as f:
            _copy_verified(f, out, desc, f"{self.layout.root}: blob {desc.digest}")

    def read(self, desc):
        _check_config_size(desc)
        return self.layout.read_blob(desc.digest, MAX_CONFIG_BYTES, "configs")


class OCIArchiveSource(OCISource):
    """An OCI image layout in a tar (oci-archive:FILE, what `docker buildx build -o type=oci` and `podman save
    --format oci-archive` write). Only the members a layout reads are copied out, into a temporary layout:
    `oci-layout`, `index.json` and `blobs/sha256/<64 hex>`, regular files named exactly so; no other name
    from the archive becomes a path. Their digests are checked like any layout's as they are read, and what
    is copied is bounded by the archive itself (compressed archives and sparse members, which could expand
    past it, are refused)."""

    MEMBER_RE = re.compile(r"(?:\./)?(oci-layout|index\.json|blobs/sha256/[0-9a-f]{64})")

    def __init__(self, path: str, tag: str, digest: str = ""):
        self.archive = path
        self.work = tempfile.mkdtemp(prefix="lazybuild-oci-archive-")
        try:
            self._unpack(path)
            super().__init__(self.work, tag, digest)
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise

    def _unpack(self, path: str) -> None:
        os.makedirs(os.path.join(self.work, "blobs", "sha256"))
        try:
            # Uncompressed only (what every writer of OCI archives makes): what is copied out is then bounded
            # by the archive's own size, where a compressed one could expand without end.
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    m = self.MEMBER_RE.fullmatch(info.name)
                    if not m:
                        continue  # directories, other files: a layout reads nothing else
                    if not info.isreg() or info.issparse():
                        raise TransferError(f"{path}: member {info.name!r} is not a regular file")
                    src = tf.extractfile(info)
                    # O_EXCL: a name given twice is refused rather than silently replaced.
                    try:
                        fd = os.open(os.path.join(self.work, m.group(1)), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                    except FileExistsError:
                        raise TransferError(f"{path}: member {m.group(1)!r} appears twice") from None
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError:
            raise TransferError(f"{path}: no such file", hint="oci-archive:FILE names an existing tar") from None
        except IsADirectoryError:
            raise TransferError(f"{path} is a directory; an OCI layout directory is oci:{path}") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise TransferError(f"{path}: not a readable tar ({e})") from None
        if not os.path.exists(os.path.join(self.work, "oci-layout")):
            raise TransferError(f"{path}: no oci-layout file in the archive; not an OCI layout tar",
                                hint=f"a `docker save` tarball is docker-archive:{path}")

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)


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


DIR_VERSION = b"Directory Transport Version: 1.1\n"


class DirSource(Source):
    """skopeo's dir:DIR: `manifest.json` (a manifest, or an index whose images are `<hex>.manifest.json`),
    every blob as `<hex>`, a `version` file. Like a layout's, its files are opened without following
    symlinks, only regular files, JSON capped before it is read whole, every digest checked."""

    def __init__(self, path: str):
        self.root = path
        if not os.path.isdir(path):
            raise TransferError(f"{path}: no such directory (dir:DIR names a directory skopeo wrote)")
        if not os.path.lexists(os.path.join(path, "version")):
            raise TransferError(f"{path}: no version file; not a directory skopeo's dir: transport wrote",
                                hint=f"an OCI image layout directory is oci:{path}")

    def _open(self, name: str, what: str) -> BinaryIO:
        try:
            fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise TransferError(f"{self.root}: {what} is missing") from None
        except OSError as e:
            raise TransferError(f"{self.root}: cannot open {what} ({e.strerror}; a symlink is not followed)") from None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise TransferError(f"{self.root}: {what} is not a regular file")
        return f

    def _manifest_bytes(self, name: str) -> bytes:
        with self._open(name, name) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise TransferError(f"{self.root}: {name} is over the {size_text(MAX_MANIFEST_BYTES)} cap for manifests")
        return raw

    def manifests(self, platform, all_platforms):
        try:
            doc = parse_manifest_or_index(self._manifest_bytes("manifest.json"))
            if isinstance(doc, Manifest):
                return [(doc, None)]
            chosen = doc.manifests if all_platforms else [doc.select(platform or Platform.host())]
            out = []
            for d in chosen:
                if d.media_type in INDEX_TYPES:
                    continue  # nested indexes (attestations and the like) are not images
                raw = self._manifest_bytes(f"{digest_hex(d.digest)}.manifest.json")
                if sha256_digest(raw) != d.digest:
                    raise TransferError(f"{self.root}: {digest_hex(d.digest)}.manifest.json is corrupt (its content "
                                        "has another digest)")
                out.append((Manifest.parse(raw, d.media_type), d.platform))
            return out
        except (ValueError, LookupError) as e:  # a bad digest or size inside, or no such platform
            raise TransferError(f"{self.root}: {e}") from None

    def fetch(self, desc, out, progress=None):
        with self._open(digest_hex(desc.digest), f"blob {desc.digest}") as f:
            _copy_verified(f, out, desc, f"{self.root}: blob {desc.digest}")


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
    if loc.kind == REGISTRY:
        return RegistrySource(loc.ref, insecure)
    if loc.kind == OCI:
        return OCISource(loc.path, loc.tag, loc.digest)
    if loc.kind == OCI_ARCHIVE:
        return OCIArchiveSource(loc.path, loc.tag, loc.digest)
    if loc.kind == DIR:
        return DirSource(loc.path)
    return ArchiveSource(loc.path, loc.tag)


def read_image(loc: Location, platform: Platform | None, insecure: bool = False) -> tuple[Manifest, bytes]:
    """The manifest of LOC's image for PLATFORM (this machine's if None) and its config's bytes (verified)."""
    src = open_source(loc, insecure)
    try:
        images = src.manifests(platform, False)
        if not images:
            raise TransferError(f"{loc}: no image for this platform")
        manifest = images[0][0]
        return manifest, src.read(manifest.config)
    finally:
        src.close()


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
                # the layout's own files only: a copy stages its blobs in a temporary directory beside them
                for name in ("oci-layout", "index.json", "blobs"):
                    tf.add(os.path.join(self.work, name), name, filter=_no_staging)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)


def _no_staging(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if os.path.basename(info.name).startswith(".") else info


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


class DirDest(Dest):
    """skopeo's dir:DIR, as `skopeo copy` writes it: blobs as `<hex>`, `manifest.json` (with several platforms
    the index, each image as `<hex>.manifest.json`), the `version` file; every file under a temporary name."""

    def __init__(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.root = self.staging_dir = path

    def put_blob(self, desc, path):
        os.chmod(path, 0o644)
        os.replace(path, os.path.join(self.root, digest_hex(desc.digest)))
        return "stored"

    def put_manifest(self, manifest):
        pass  # written by finish(): one image is manifest.json itself

    def finish(self, images):
        if len(images) == 1:
            m = images[0][0]
            write_atomic(os.path.join(self.root, "manifest.json"), m.raw)
            digest = m.digest
        else:
            for m, _ in images:
                write_atomic(os.path.join(self.root, f"{digest_hex(m.digest)}.manifest.json"), m.raw)
            index = Index.build([m.descriptor(p) for m, p in images])
            write_atomic(os.path.join(self.root, "manifest.json"), index.raw)
            digest = index.digest
        write_atomic(os.path.join(self.root, "version"), DIR_VERSION)
        return digest


def open_dest(loc: Location, insecure: bool = False, mount_from: str | None = None) -> Dest:
    if loc.digest:
        raise LocationError(f"{loc}: a destination is named by a tag, not a digest (the digest is what the copy makes)")
    if loc.kind == REGISTRY:
        if loc.ref.digest:
            raise LocationError(f"{loc}: a destination is named by a tag, not a digest (the digest is what the copy makes)")
        return RegistryDest(loc.ref, insecure, mount_from)
    if loc.kind == OCI:
        return OCIDest(loc.path, loc.tag)
    if loc.kind == OCI_ARCHIVE:
        return OCIArchiveDest(loc.path, loc.tag)
    if loc.kind == DIR:
        return DirDest(loc.path)
    return ArchiveDest(loc.path, loc.tag)


class LocalImage:
    """One image of a local location as an OCI layout on disk, for readers that serve it (`lazybuild mount` and
    `optimize` through lazybuild.localregistry): a layout directory as it is, an oci-archive unpacked, a
    docker-archive or a skopeo dir copied into a temporary layout. `close()` removes what was made."""

    def __init__(self, loc: Location, platform: Platform | None = None):
        self.temp = None
        if loc.kind in (DOCKER_ARCHIVE, DIR):
            self.temp = tempfile.mkdtemp(prefix="lazybuild-local-")
            try:
                src, dst = open_source(loc), OCIDest(self.temp, "image")
                try:
                    copy_image(src, dst, platform=platform)
                finally:
                    src.close()
                    dst.close()
                self.source: OCISource = OCISource(self.temp, "image")
            except BaseException:
                shutil.rmtree(self.temp, ignore_errors=True)
                raise
        elif loc.kind in (OCI, OCI_ARCHIVE):
            self.source = open_source(loc)
        else:
            raise LocationError(f"{loc} is in a registry, not a local image")
        try:
            images = self.source.manifests(platform, False)
            if not images:
                raise TransferError(f"{loc}: no image for this platform")
        except BaseException:
            self.close()
            raise
        self.manifest: Manifest = images[0][0]
        self.layout: OCILayout = self.source.layout

    def close(self) -> None:
        if getattr(self, "source", None) is not None:
            self.source.close()
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the loop -------------------------------------------------------------------------------------------



def is_estargz(layer: Descriptor) -> bool:
    """Whether a layer is eStargz already, by its descriptor: the TOC digest annotation (a registry's Docker
    schema 2 manifest has no layer annotations, so its layers count as not eStargz). `convert` and the
    in-BuildKit export step keep such layers as they are."""
    from .estargz import TOC_DIGEST_ANNOTATION

    return TOC_DIGEST_ANNOTATION in layer.annotations

@dataclass
class ConvertOptions:
    """What `convert` makes of each layer (nerdctl's names): eStargz with gzip, eStargz with zstd
    (zstd:chunked-compatible) or plain zstd (not eStargz)."""
    format: str = "estargz"  # estargz | zstdchunked | zstd
    level: int | None = None  # compression level (None: the format's default)
    chunk_size: int = 4 << 20
    prioritized_files: list[str] | None = None  # for every layer that holds them
    force: bool = False  # convert layers already in the format too
    # layer index -> its paths to put first (`lazybuild optimize`: each layer's first reads, in order)
    prioritized_by_layer: dict[int, list[str]] | None = None

    def __post_init__(self):
        if self.format not in ("estargz", "zstdchunked", "zstd"):
            raise InputError(f"layer format {self.format!r}: estargz, zstdchunked or zstd")

    def wants(self, layer: Descriptor) -> bool:
        """Whether LAYER is to be converted (a layer already in the format is kept unless forced)."""
        if self.force:
            return True
        if self.format == "zstd":
            return not layer.media_type.endswith("zstd") or is_estargz(layer)
        return not is_estargz(layer)

    def prioritized(self, index: int) -> list[str]:
        if self.prioritized_by_layer is not None:
            return self.prioritized_by_layer.get(index, [])
        return self.prioritized_files or []


@dataclass
class PlainLayer:
    """A layer written as plain zstd: its digests and size (the estargz writer's LayerBlob says the same of
    eStargz ones)."""
    media_type: str
    digest: str
    size: int
    diff_id: str
    annotations: dict


def write_zstd_layer(src: str, dest: str, level: int | None = None) -> PlainLayer:
    """The tar in SRC (plain, gzip or zstd) as a plain zstd layer in DEST, written under a temporary name."""
    import zstandard
    from zlib_ng import gzip_ng

    from .estargz.tarinput import sniff

    raw_hash, out_hash, size, kind = hashlib.sha256(), hashlib.sha256(), 0, "tar"
    fd, tmp = tempfile.mkstemp(prefix=".zstd-", dir=os.path.dirname(os.path.abspath(dest)))
    try:
        with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            kind = sniff(f.read(4))
            f.seek(0)
            if kind == "gzip":
                reader = gzip_ng.GzipFile(fileobj=f, mode="rb")
            elif kind == "zstd":
                reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            else:
                reader = f

            class Hashing:  # counts and hashes the compressed bytes on their way to the file
                def write(self, data):
                    nonlocal size
                    out_hash.update(data)
                    size += len(data)
                    return out.write(data)

            compressor = zstandard.ZstdCompressor(level=3 if level is None else level)
            with compressor.stream_writer(Hashing(), closefd=False) as zw:
                for block in iter(lambda: reader.read(1 << 20), b""):
                    raw_hash.update(block)
                    zw.write(block)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise TransferError(f"{src}: the layer is not a readable {kind} stream ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return PlainLayer(OCI_LAYER_ZSTD, "sha256:" + out_hash.hexdigest(), size, "sha256:" + raw_hash.hexdigest(), {})


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
                if convert is not None and convert.wants(layer):
                    # A temporary name until the source has verified every byte; the destination names it.
                    fd, path = tempfile.mkstemp(prefix=".fetch-", dir=tmp)
                    with os.fdopen(fd, "w+b") as f:
                        src.fetch(layer, f, fetch_progress)
                    out = path + ".out"
                    if convert.format == "zstd":
                        blob = write_zstd_layer(path, out, convert.level)
                        made = f"{blob.digest} ({blob.size} bytes, plain zstd)"
                    else:
                        blob = estargz.convert_file(path, out, compression="zstd" if convert.format == "zstdchunked" else "gzip",
                                                    level=convert.level, chunk_size=convert.chunk_size,
                                                    prioritized_files=convert.prioritized(i),
                                                    allow_prioritized_not_found=True,
                                                    progress=layer_progress(f"{label} convert") if layer_progress else None)
                        made = f"{blob.digest} ({blob.size} bytes, TOC {blob.toc_digest})"
                    os.unlink(path)
                    path = out
                    layer = Descriptor(blob.media_type, blob.digest, blob.size, dict(blob.annotations))
                    diff_ids.append(blob.diff_id)
                    changed = True
                    log(f"layer {i + 1}/{len(manifest.layers)}: {made}")
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


__all__ = ["ConvertOptions", "Dest", "LocalImage", "Location", "OCIArchiveDest", "OCIArchiveSource", "LocationError", "OCIDest", "RegistryDest", "Source",
           "TransferError", "as_oci_layer", "copy_image", "open_dest", "open_source", "RegistryError", "LayoutError"]
