"""A build's result -> an image: each step's upper dir becomes an eStargz (gzip or zstd) layer on top of
the base image's layers, with the config (diff_ids, history) and an OCI manifest; then pushed, written
as an OCI layout (directory or tar), or flattened into a root filesystem (tar or directory).

Base layers are not downloaded to push: on the same registry they are mounted cross-repository.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field

from lazybuild.estargz import convert_file
from lazybuild.errors import BuildFailure
from lazybuild.image import OCI_CONFIG, Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.layout import OCILayout
from lazybuild.registry import Reference, Registry

from .diff import write_layer

OUTPUT_TYPES = ("stargz", "oci", "tar", "local")


class ExportError(BuildFailure):
    pass


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


@dataclass
class BuiltLayer:
    descriptor: Descriptor
    diff_id: str
    path: str = ""  # the local blob; empty for a base layer that stays in its registry
    image: object = None  # the BaseImage a base layer comes from


@dataclass
class BuiltImage:
    manifest: Manifest
    config: bytes
    layers: list[BuiltLayer]
    workdir: str

    @property
    def digest(self) -> str:
        return self.manifest.digest


def build_image(result, compression: str = "gzip", prioritized: dict[int, list[str]] | None = None,
                source_date_epoch: int | None = None, log=print) -> BuiltImage:
    """Write the new layers as eStargz and assemble config + manifest (nothing is pushed yet)."""
    work = tempfile.mkdtemp(prefix="lazybuild-export-")
    layers: list[BuiltLayer] = []
    diff_ids: list[str] = []
    for i, layer in enumerate(result.target.layers):
        if layer.image is not None:
            desc = layer.image.manifest.layers[layer.index]
            base_ids = layer.image.diff_ids
            diff_id = base_ids[layer.index] if layer.index < len(base_ids) else ""
            layers.append(BuiltLayer(desc, diff_id, image=layer.image))
            diff_ids.append(diff_id)
            continue
        tar = os.path.join(work, f"{i}.tar")
        n = write_layer(layer.path, tar, source_date_epoch)
        blob_path = os.path.join(work, f"{i}.blob")
        blob = convert_file(tar, blob_path, compression=compression, prioritized_files=(prioritized or {}).get(i, []),
                            allow_prioritized_not_found=True)
        os.unlink(tar)
        log(f"  layer {i}: {n} entries, {blob.size} bytes ({compression} eStargz) {blob.digest[:19]}")
        desc = Descriptor(blob.media_type, blob.digest, blob.size, annotations=dict(blob.annotations))
        layers.append(BuiltLayer(desc, blob.diff_id, path=blob_path))
        diff_ids.append(blob.diff_id)
    config = dict(result.config)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    created = (datetime.datetime.fromtimestamp(source_date_epoch, datetime.timezone.utc) if source_date_epoch is not None
               else datetime.datetime.now(datetime.timezone.utc))
    config["created"] = created.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if source_date_epoch is None else "%Y-%m-%dT%H:%M:%SZ")
    config["history"] = _history(config.get("history") or [], len(layers), config["created"])
    raw_config = canonical_json(config)
    cdesc = Descriptor(OCI_CONFIG, sha256_digest(raw_config), len(raw_config))
    manifest = Manifest.build(cdesc, [lay.descriptor for lay in layers])
    return BuiltImage(manifest, raw_config, layers, work)


def _history(history: list[dict], layer_count: int, created: str) -> list[dict]:
    """One non-empty history entry per layer, as image tools expect; times filled in."""
    out = [dict(h) for h in history]
    for h in out:
        h.setdefault("created", created)
    non_empty = [h for h in out if not h.get("empty_layer")]
    for h in non_empty[layer_count:]:
        h["empty_layer"] = True
    for _ in range(layer_count - len(non_empty)):
        out.append({"created": created, "created_by": "lazybuild", "comment": "lazybuild.exporter"})
    return out


def push(image: BuiltImage, tags: list[str], insecure: bool = False, log=print) -> str:
    """Push to each tag: new blobs uploaded, base layers mounted from their repository when on the same
    registry (fetched and uploaded otherwise). Returns the manifest digest."""
    for tag in tags:
        ref = Reference.parse(tag)
        reg = Registry(ref.host, insecure=insecure)
        for lay in image.layers:
            if lay.path:
                how = reg.push_blob(ref.repository, lay.descriptor.digest, lay.descriptor.size,
                                    lambda p=lay.path: open(p, "rb"))
            elif lay.image.ref.host == ref.host:
                how = reg.push_blob(ref.repository, lay.descriptor.digest, lay.descriptor.size,
                                    lambda lay=lay: _fetch_to_temp(lay), mount_from=lay.image.ref.repository)
            else:
                how = reg.push_blob(ref.repository, lay.descriptor.digest, lay.descriptor.size,
                                    lambda lay=lay: _fetch_to_temp(lay))
            log(f"  {lay.descriptor.digest[:19]} {how}")
        reg.push_blob(ref.repository, image.manifest.config.digest, len(image.config),
                      lambda: io.BytesIO(image.config))
        reg.put_manifest(ref.repository, ref.tag or "latest", image.manifest.raw, image.manifest.media_type)
        log(f"pushed {ref} @ {image.digest}")
    return image.digest


def _fetch_to_temp(lay: BuiltLayer):
    f = tempfile.TemporaryFile()
    lay.image.registry.fetch_blob(lay.image.ref.repository, lay.descriptor.digest, f)
    f.seek(0)
    return f


def write_layout(image: BuiltImage, dest: str, tag: str = "latest", as_tar: bool = False, log=print) -> str:
    """An OCI image layout with every blob (base layers fetched), as a directory or a tar."""
    root = dest if not as_tar else tempfile.mkdtemp(prefix="lazybuild-layout-")
    try:
        layout = OCILayout(root, create=True)
        for lay in image.layers:
            if layout.has_blob(lay.descriptor.digest):
                continue
            if lay.path:
                layout.write_blob(lay.descriptor.digest, lambda out, p=lay.path: shutil.copyfileobj(open(p, "rb"), out))
            else:
                layout.write_blob(lay.descriptor.digest, lambda out, lay=lay: lay.image.registry.fetch_blob(
                    lay.image.ref.repository, lay.descriptor.digest, out))
        layout.put_bytes(image.config)
        layout.put_bytes(image.manifest.raw)
        layout.add_to_index(image.manifest.descriptor(), tag)
        if as_tar:
            tmp = dest + ".partial"
            with tarfile.open(tmp, "w") as tf:
                for name in sorted(os.listdir(root)):
                    tf.add(os.path.join(root, name), name)
            os.replace(tmp, dest)
    finally:
        if as_tar:
            shutil.rmtree(root, ignore_errors=True)
    log(f"wrote OCI layout {dest} ({tag} @ {image.digest})")
    return image.digest


def write_rootfs(builder, result, dest: str, as_tar: bool, log=print) -> None:
    """The final filesystem (every base file is read, so fetched) as a tar or a directory."""
    view = builder.view(result.target.layers, "output")
    if as_tar:
        tmp = dest + ".partial"
        p = subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", view, "-cf", tmp, "."],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise ExportError(f"writing {dest}: {p.stderr.strip()}")
        os.replace(tmp, dest)
    else:
        os.makedirs(dest, exist_ok=True)
        p = subprocess.run(["cp", "-a", view + "/.", dest], capture_output=True, text=True)
        if p.returncode != 0:
            raise ExportError(f"writing {dest}: {p.stderr.strip()}")
    log(f"wrote the root filesystem to {dest}")


def summary(image: BuiltImage) -> dict:
    return {"containerimage.digest": image.digest, "containerimage.config": json.loads(image.config),
            "layers": [{"digest": lay.descriptor.digest, "size": lay.descriptor.size, "mediaType": lay.descriptor.media_type,
                        "base": not lay.path} for lay in image.layers]}
