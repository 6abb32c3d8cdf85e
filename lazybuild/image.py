"""The OCI / Docker image model: media types, descriptors, manifests, indexes, configs, platforms.

Manifests are kept as the exact bytes they came in (their digest is the sha256 of those bytes) next to
their parsed JSON; new ones are serialized once, compactly, and those bytes are what gets pushed.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field

from .digest import check_digest, sha256_digest  # noqa: F401  (sha256_digest re-exported for the model's users)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# What a client asks a registry for, most wanted first.
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"




def canonical_json(obj) -> bytes:
    """The bytes we write for a manifest/index/config we make: compact, keys in insertion order."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """`linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`."""
        parts = text.strip().split("/")
        if len(parts) < 2 or len(parts) > 3 or not all(parts):
            raise ValueError(f"platform {text!r} is not os/arch[/variant] (e.g. linux/amd64)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "").normalized()

    @classmethod
    def host(cls) -> "Platform":
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
        return cls("linux", arch, "v7" if arch == "arm" else "").normalized()

    @classmethod
    def from_json(cls, d: dict | None) -> "Platform | None":
        if not d:
            return None
        return cls(d.get("os", ""), d.get("architecture", ""), d.get("variant", "")).normalized()

    def normalized(self) -> "Platform":
        variant = self.variant
        if self.architecture == "arm64" and variant == "v8":
            variant = ""  # arm64 means v8, as containerd's platforms package normalizes it
        return Platform(self.os, self.architecture, variant)

    def matches(self, other: "Platform | None") -> bool:
        if other is None:
            return False
        return (self.os, self.architecture) == (other.os, other.architecture) and (
            not self.variant or self.variant == other.variant
        )

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict) -> "Descriptor":
        try:
            return cls(
                media_type=d.get("mediaType", ""),
                digest=check_digest(d["digest"]),
                size=int(d["size"]),
                annotations=dict(d.get("annotations") or {}),
                platform=Platform.from_json(d.get("platform")),
                urls=list(d.get("urls") or []),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad descriptor {d!r:.200}: {e}") from e

    def to_json(self) -> dict:
        d: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = self.urls
        if self.annotations:
            d["annotations"] = self.annotations
        if self.platform is not None:
            p = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            d["platform"] = p
        return d


@dataclass
class Manifest:
    """An image manifest (OCI or Docker schema2) with its exact bytes."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "") -> "Manifest":
        doc = _load(raw, "manifest")
        mt = doc.get("mediaType") or media_type or OCI_MANIFEST
        if mt not in MANIFEST_TYPES:
            raise ValueError(f"not an image manifest: media type {mt!r}")
        if doc.get("schemaVersion") != 2:
            raise ValueError(f"manifest schemaVersion {doc.get('schemaVersion')!r} is not 2")
        try:
            return cls(raw, mt, Descriptor.from_json(doc["config"]), [Descriptor.from_json(x) for x in doc["layers"]],
                       dict(doc.get("annotations") or {}))
        except KeyError as e:
            raise ValueError(f"manifest has no {e.args[0]!r}") from None

    @classmethod
    def build(cls, config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None,
              media_type: str = OCI_MANIFEST) -> "Manifest":
        doc: dict = {"schemaVersion": 2, "mediaType": media_type, "config": config.to_json(),
                     "layers": [x.to_json() for x in layers]}
        if annotations:
            doc["annotations"] = annotations
        return cls(canonical_json(doc), media_type, config, layers, dict(annotations or {}))

    def descriptor(self, platform: Platform | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw), platform=platform)


@dataclass
class Index:
    """An OCI image index or Docker manifest list with its exact bytes."""

    raw: bytes
    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "") -> "Index":
        doc = _load(raw, "index")
        mt = doc.get("mediaType") or media_type or OCI_INDEX
        if mt not in INDEX_TYPES:
            raise ValueError(f"not an image index: media type {mt!r}")
        return cls(raw, mt, [Descriptor.from_json(x) for x in doc.get("manifests") or []],
                    dict(doc.get("annotations") or {}))

    @classmethod
    def build(cls, manifests: list[Descriptor], annotations: dict[str, str] | None = None) -> "Index":
        doc: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m.to_json() for m in manifests]}
        if annotations:
            doc["annotations"] = annotations
        return cls(canonical_json(doc), OCI_INDEX, manifests, dict(annotations or {}))

    def select(self, platform: Platform) -> Descriptor:
        for d in self.manifests:
            if d.media_type in INDEX_TYPES + MANIFEST_TYPES and platform.matches(d.platform):
                return d
        have = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise LookupError(f"no manifest for platform {platform} (the index has: {have}); try --platform")


def parse_manifest_or_index(raw: bytes, media_type: str = "") -> Manifest | Index:
    doc = _load(raw, "manifest")
    mt = doc.get("mediaType") or media_type
    if mt in INDEX_TYPES or (not mt and "manifests" in doc):
        return Index.parse(raw, mt)
    return Manifest.parse(raw, mt)


def _load(raw: bytes, what: str) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    return doc


def is_layer(media_type: str) -> bool:
    return media_type.startswith(("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs."))
