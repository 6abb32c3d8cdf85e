"""The OCI / Docker image model: media types, descriptors, manifests, indexes, configs, platforms.

Manifests are kept as the exact bytes they came in (their digest is the sha256 of those bytes) next to
their parsed JSON; new ones are serialized once, compactly, and those bytes are what gets pushed.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field

from .digest import check_digest, sha256_digest  # noqa: F401  (sha256_digest re-exported for the model's users)
from .errors import InputError

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

# Caps on the JSON documents an image is made of, wherever they come from (a registry, a layout, an
# archive): they are read whole into memory before their digest can be checked. Manifests and indexes
# are a few KiB; 4 MiB is containerd's limit for them. Configs carry the history, a few KiB per
# layer: 8 MiB leaves room for hundreds of layers with long commands.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20


def size_text(n: int) -> str:
    """4194304 -> "4 MiB" (caps are named this way in errors)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


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
            raise InputError(f"platform {text!r} is not os/arch[/variant] (e.g. linux/amd64)")
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
        if not isinstance(d, dict) or not all(isinstance(d.get(k, ""), str) for k in ("os", "architecture", "variant")):
            raise ValueError(f"platform {d!r:.100} is not an object of strings")
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
    def from_json(cls, d: dict, what: str = "descriptor") -> "Descriptor":
        """A descriptor from a manifest, an index or a layout; its digest is checked here, where it enters,
        because it later names files (blobs/sha256/HEX, cache entries) and URLs."""
        if not isinstance(d, dict):
            raise ValueError(f"{what}: {d!r:.100} is not a JSON object")
        try:
            size = d["size"]
            # JSON numbers only: a bool is an int in Python, and a negative size describes nothing.
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"size {size!r:.40} is not a non-negative integer")
            annotations = d.get("annotations") or {}
            if not isinstance(annotations, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
                raise ValueError("annotations are not an object of strings")
            urls = d.get("urls") or []
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise ValueError("urls is not a list of strings")
            media_type = d.get("mediaType", "")
            if not isinstance(media_type, str):
                raise ValueError("mediaType is not a string")
            return cls(
                media_type=media_type,
                digest=check_digest(d["digest"], f"{what} digest"),
                size=size,
                annotations=dict(annotations),
                platform=Platform.from_json(d.get("platform")),
                urls=list(urls),
            )
        except KeyError as e:
            raise ValueError(f"{what} {d!r:.200} has no {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad {what} {d!r:.200}: {e}") from None

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
        if "config" not in doc or "layers" not in doc:
            raise ValueError(f"manifest has no {'config' if 'config' not in doc else 'layers'!r}")
        if not isinstance(doc["layers"], list):
            raise ValueError("manifest layers are not a list")
        return cls(raw, mt, Descriptor.from_json(doc["config"], "config descriptor"),
                   [Descriptor.from_json(x, f"layer {i} descriptor") for i, x in enumerate(doc["layers"])],
                   _annotations(doc))

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
        manifests = doc.get("manifests") or []
        if not isinstance(manifests, list):
            raise ValueError("index manifests are not a list")
        return cls(raw, mt, [Descriptor.from_json(x, f"index entry {i}") for i, x in enumerate(manifests)],
                   _annotations(doc))

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
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes, over the {size_text(MAX_MANIFEST_BYTES)} cap for manifests")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise ValueError(f"{what} is nested too deeply to be a manifest") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    mt = doc.get("mediaType")
    if mt is not None and not isinstance(mt, str):
        raise ValueError(f"{what} mediaType is not a string")
    return doc


def _annotations(doc: dict) -> dict[str, str]:
    a = doc.get("annotations") or {}
    if not isinstance(a, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in a.items()):
        raise ValueError("annotations are not an object of strings")
    return dict(a)


def is_layer(media_type: str) -> bool:
    return media_type.startswith(("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs."))
