"""`--output` of `lazybuild build`, as `docker buildx build` spells it, and where each kind of output goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from lazybuild.registry import Reference
from lazybuild.transfer import Dest, OCIArchiveDest, OCIDest, RegistryDest

from .assemble import ExportError

OUTPUT_TYPES = ("stargz", "oci", "tar", "local")


@dataclass
class OutputSpec:
    """`--output type=stargz|oci|tar|local[,compression=gzip|zstd][,dest=PATH][,push=true]`."""

    type: str = "stargz"
    compression: str = "gzip"
    dest: str = ""
    push: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "OutputSpec":
        spec = cls()
        for part in [p for p in text.split(",") if p]:
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq and key in OUTPUT_TYPES:  # `--output stargz` for `--output type=stargz`
                spec.type = key
                continue
            if key == "type":
                if value not in OUTPUT_TYPES:
                    raise ExportError(f"--output type={value}: want one of {', '.join(OUTPUT_TYPES)}")
                spec.type = value
            elif key == "compression":
                if value not in ("gzip", "zstd"):
                    raise ExportError(f"--output compression={value}: want gzip or zstd")
                spec.compression = value
            elif key == "dest":
                spec.dest = value
            elif key == "push":
                spec.push = value.lower() in ("true", "1", "yes", "")
            else:
                spec.extra[key] = value
        if spec.type in ("tar", "local", "oci") and not spec.dest:
            raise ExportError(f"--output type={spec.type} needs dest=PATH")
        if spec.push and spec.type != "stargz":
            raise ExportError("push=true goes with type=stargz")
        return spec

    @property
    def is_image(self) -> bool:
        """An image (layers, config, manifest) rather than a root filesystem (type=tar|local)."""
        return self.type in ("stargz", "oci")

    @property
    def layout_is_tar(self) -> bool:
        return self.dest.endswith(".tar") or (self.type == "oci" and self.extra.get("tar") == "true")


def image_destinations(spec: OutputSpec, tags: list[str], insecure: bool = False) -> list[tuple[Dest, str]]:
    """Where an image output goes, each with what the log says once it is there: the OCI layout
    (directory or tar) at dest=, then with push=true each tag's registry. The caller closes them."""
    out: list[tuple[Dest, str]] = []
    if spec.dest:
        # type=oci names its index entry after the first tag, as buildx does; stargz layouts say latest.
        tag = (Reference.parse(tags[0]).tag or "latest") if spec.type == "oci" and tags else "latest"
        layout = OCIArchiveDest(spec.dest, tag) if spec.layout_is_tar else OCIDest(spec.dest, tag)
        out.append((layout, f"wrote OCI layout {spec.dest} ({tag})"))
    if spec.push:
        out += [push_destination(tag, insecure) for tag in tags]
    return out


def push_destination(tag: str, insecure: bool = False) -> tuple[Dest, str]:
    ref = Reference.parse(tag)
    return RegistryDest(ref, insecure), f"pushed {ref}"
