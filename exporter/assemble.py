"""The one export path: layers -> eStargz blobs -> image config -> manifest -> a destination.

Both entry points go through it and say only what differs: where their diffs come from (`daemonless.py`:
the builder's overlay upper dirs; `buildkit.py`: BuildKit's states, diffed tree against tree) and where
the image goes (a `lazybuild.transfer` destination: a registry, an OCI layout directory or tar).

A layer is either new (a diff, written as a layer tar, then as eStargz with its prioritized files first),
kept (a base image's layer that stays where its source holds it: a registry destination then mounts it
from its repository, or finds it there, instead of downloading it; a layout fetches it, verified against
its digest), or converted (a base image's layer that is not eStargz: fetched by digest, verified, and
written again as eStargz, as `lazybuild convert` does).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

from lazybuild.errors import BuildFailure
from lazybuild.estargz import convert_file
from lazybuild.image import OCI_CONFIG, Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.transfer import Dest, Source, as_oci_layer

Log = Callable[[str], None]


class ExportError(BuildFailure):
    pass


class LayerDiff(Protocol):
    """Where a new layer's change comes from (`diff.UpperDirDiff`, `tree_diff.TreeDiff`)."""

    def write_tar(self, out_path: str, source_date_epoch: int | None = None) -> int:
        """Write the change as an OCI layer tar at OUT_PATH; returns its number of entries."""


@dataclass(frozen=True)
class NewLayer:
    """A layer this build made; its prioritized files lead the eStargz blob (before `.prefetch.landmark`)."""

    diff: LayerDiff
    prioritized_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeptLayer:
    """A base image's layer kept as it is: its bytes stay where `source` reads them."""

    descriptor: Descriptor
    diff_id: str
    source: Source


@dataclass(frozen=True)
class ConvertedLayer:
    """A base image's layer that is not eStargz, made eStargz here: fetched from `source` by its digest
    (verified, cut off at its size) and converted with the new layers' compression. eStargz adds the
    TOC and landmark entries to the tar, so the diff_id is the new blob's, not the base config's.
    Its prioritized files (a workload's, say) lead it, as a new layer's do; those it lacks are passed over."""

    descriptor: Descriptor
    source: Source
    prioritized_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportedLayer:
    descriptor: Descriptor
    diff_id: str
    blob_path: str = ""  # the eStargz blob this export wrote; empty for a kept layer
    source: Source | None = None  # where a kept layer stays

    @property
    def kept(self) -> bool:
        return not self.blob_path


@dataclass
class ExportedImage:
    """An image ready to send: its new blobs in `work_dir`, its config and manifest in memory."""

    manifest: Manifest
    config: bytes
    layers: list[ExportedLayer]
    work_dir: str
    sources: list[Source] = field(default_factory=list)  # closed with the image

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def send(self, dest: Dest, log: Log = lambda s: None) -> str:
        """Put every blob, the config and the manifest into DEST and record it there (tag, index entry).
        Returns the manifest digest. The image stays usable for further destinations."""
        for layer in self.layers:
            if layer.kept:
                how = dest.put_blob_from(layer.descriptor, layer.source)
            else:
                how = self._put_staged(dest, layer.descriptor, lambda path, src=layer.blob_path: _link_or_copy(src, path))
            log(f"  {layer.descriptor.digest[:19]} {how}")
        self._put_staged(dest, self.manifest.config, lambda path: _write(path, self.config))
        dest.put_manifest(self.manifest)
        return dest.finish([(self.manifest, None)])

    def _put_staged(self, dest: Dest, desc: Descriptor, make: Callable[[str], None]) -> str:
        # A destination may keep (rename) or drop the file it is given: it gets its own name of the
        # blob, on its own filesystem when it has one, and our copy stays for the next destination.
        path = os.path.join(dest.staging_dir or self.work_dir, f".stage-{uuid.uuid4().hex}")
        try:
            make(path)
            return dest.put_blob(desc, path)
        finally:
            if os.path.lexists(path):
                os.unlink(path)

    def summary(self) -> dict:
        """What `--metadata-file` records (the keys `docker buildx build --metadata-file` has, and the layers)."""
        return {"containerimage.digest": self.digest, "containerimage.config": json.loads(self.config),
                "layers": [{"digest": lay.descriptor.digest, "size": lay.descriptor.size,
                            "mediaType": lay.descriptor.media_type, "base": lay.kept} for lay in self.layers]}

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        for source in self.sources:
            source.close()


def export_image(layers: list[NewLayer | KeptLayer | ConvertedLayer], config: dict, *, compression: str = "gzip",
                 source_date_epoch: int | None = None, work_parent: str | None = None,
                 log: Log = lambda s: None) -> ExportedImage:
    """Write each new or converted layer as an eStargz blob (in a work dir under WORK_PARENT) and assemble
    the config (diff_ids, created, one history entry per layer) and the OCI manifest. Nothing is sent yet."""
    work_dir = tempfile.mkdtemp(prefix=".lazybuild-export-", dir=work_parent)
    try:
        exported = []
        for i, layer in enumerate(layers):
            if isinstance(layer, KeptLayer):
                # In an OCI manifest a Docker layer is named by its OCI media type (same bytes, same digest).
                exported.append(ExportedLayer(as_oci_layer(layer.descriptor), layer.diff_id, source=layer.source))
                continue
            blob_path = os.path.join(work_dir, f"{i}.blob")
            if isinstance(layer, ConvertedLayer):
                fetched = os.path.join(work_dir, f"{i}.fetched")
                with open(fetched, "wb") as f:
                    layer.source.fetch(layer.descriptor, f)  # verified against its digest before it is read
                blob = convert_file(fetched, blob_path, compression=compression, tmpdir=work_dir,
                                    prioritized_files=list(layer.prioritized_files), allow_prioritized_not_found=True)
                os.unlink(fetched)
                log(f"  layer {i}: base layer {layer.descriptor.digest[:19]} ({layer.descriptor.size} bytes) -> "
                    f"{blob.size} bytes ({compression} eStargz) {blob.digest[:19]}")
            else:
                tar = os.path.join(work_dir, f"{i}.tar")
                entries = layer.diff.write_tar(tar, source_date_epoch)
                blob = convert_file(tar, blob_path, compression=compression, tmpdir=work_dir,
                                    prioritized_files=list(layer.prioritized_files), allow_prioritized_not_found=True)
                os.unlink(tar)
                log(f"  layer {i}: {entries} entries, {blob.size} bytes ({compression} eStargz) {blob.digest[:19]}")
            desc = Descriptor(blob.media_type, blob.digest, blob.size, annotations=dict(blob.annotations))
            exported.append(ExportedLayer(desc, blob.diff_id, blob_path=blob_path))
        raw_config = image_config(config, [lay.diff_id for lay in exported], source_date_epoch)
        config_desc = Descriptor(OCI_CONFIG, sha256_digest(raw_config), len(raw_config))
        manifest = Manifest.build(config_desc, [lay.descriptor for lay in exported])
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    # Every source a layer came from is closed with the image (a converted layer's too: it may be shared).
    sources = list({id(lay.source): lay.source for lay in layers if isinstance(lay, (KeptLayer, ConvertedLayer))}.values())
    return ExportedImage(manifest, raw_config, exported, work_dir, sources)


def image_config(config: dict, diff_ids: list[str], source_date_epoch: int | None = None) -> bytes:
    """The image config as it is stored: CONFIG with the layers' diff_ids, the creation time
    (SOURCE_DATE_EPOCH when given, for reproducible images) and a history that has one non-empty
    entry per layer, as image tools expect."""
    out = dict(config)
    out["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    if source_date_epoch is not None:
        created = datetime.datetime.fromtimestamp(source_date_epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out["created"] = created
    out["history"] = _history(out.get("history") or [], len(diff_ids), created)
    return canonical_json(out)


def _history(history: list[dict], layer_count: int, created: str) -> list[dict]:
    """One non-empty entry per layer: entries past the layers become empty, missing ones are added; times filled in."""
    out = [dict(h) for h in history]
    for h in out:
        h.setdefault("created", created)
    non_empty = [h for h in out if not h.get("empty_layer")]
    for h in non_empty[layer_count:]:
        h["empty_layer"] = True
    for _ in range(layer_count - len(non_empty)):
        out.append({"created": created, "created_by": "lazybuild", "comment": "lazybuild.exporter"})
    return out


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)  # same filesystem: a second name, no bytes copied
    except OSError:
        shutil.copyfile(src, dest)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
