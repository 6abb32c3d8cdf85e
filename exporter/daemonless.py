"""`lazybuild build`'s export: the daemonless builder's result through the one export path (`assemble.py`).

What is particular here: each new layer's diff is its step's overlay upper dir, the base image's layers
are kept and stay in their registry (a push to the same registry mounts them cross-repository, so they are
never downloaded), and `--optimize` pushes once, records what the image's workload reads, and exports
again with those files first in each new layer.

The result is read through its attributes: `result.config` (the image config), `result.target.layers`,
each with `path` (its upper dir) and, for a base image's layer, `image` (`ref`, `manifest`, `diff_ids`)
and `index` (its place in that image's manifest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lazybuild.transfer import KeptBlobsSource, RegistrySource, Source

from .assemble import ExportedImage, ExportError, KeptLayer, Log, NewLayer, export_image
from .diff import UpperDirDiff
from .optimize import record_workload
from .output import OutputSpec, image_destinations, push_destination


@dataclass(frozen=True)
class Optimize:
    """`--optimize`: the workload (empty: the image's ENTRYPOINT/CMD), how long it runs, the mounts' chunk cache."""

    workload: tuple[str, ...]
    period_s: float
    chunk_cache: str


def export_build(result, spec: OutputSpec, tags: list[str], *, insecure: bool = False,
                 source_date_epoch: int | None = None, optimize: Optimize | None = None,
                 kept_blobs: str | None = None, log: Log = lambda s: None) -> ExportedImage:
    """Export RESULT as an image and send it where SPEC says. The caller closes the returned image.
    KEPT_BLOBS: a directory where base layers fetched for the output are kept for the next build."""
    image = build_image(result, spec.compression, source_date_epoch=source_date_epoch, insecure=insecure,
                        kept_blobs=kept_blobs, log=log)
    try:
        if optimize is not None:
            image = _optimized(image, result, spec, tags[0], source_date_epoch, optimize, insecure, log)
        for dest, done in image_destinations(spec, tags, insecure):
            try:
                digest = image.send(dest, log)
            finally:
                dest.close()
            log(f"{done} @ {digest}")
    except BaseException:
        image.close()
        raise
    return image


def build_image(result, compression: str = "gzip", *, prioritized: dict[int, list[str]] | None = None,
                source_date_epoch: int | None = None, insecure: bool = False, kept_blobs: str | None = None,
                log: Log = lambda s: None) -> ExportedImage:
    """The new layers (upper dirs) as eStargz over the base image's kept layers, with config and manifest."""
    sources: dict[str, Source] = {}
    layers: list[NewLayer | KeptLayer] = []
    try:
        for i, layer in enumerate(result.target.layers):
            if layer.image is None:
                layers.append(NewLayer(UpperDirDiff(layer.path), tuple((prioritized or {}).get(i, ()))))
                continue
            base = layer.image
            diff_ids = base.diff_ids
            if len(diff_ids) != len(base.manifest.layers):
                raise ExportError(f"{base.ref}: its config lists {len(diff_ids)} diff_ids for "
                                  f"{len(base.manifest.layers)} layers; its layers cannot be kept as they are")
            if str(base.ref) not in sources:
                source: Source = RegistrySource(base.ref, insecure)
                sources[str(base.ref)] = KeptBlobsSource(source, kept_blobs) if kept_blobs else source
            layers.append(KeptLayer(base.manifest.layers[layer.index], diff_ids[layer.index], sources[str(base.ref)]))
        return export_image(layers, result.config, compression=compression, source_date_epoch=source_date_epoch, log=log)
    except BaseException:
        for source in sources.values():
            source.close()
        raise


def _optimized(image: ExportedImage, result, spec: OutputSpec, tag: str, source_date_epoch: int | None,
               optimize: Optimize, insecure: bool, log: Log) -> ExportedImage:
    """Push IMAGE to TAG, run its workload lazily mounted, and export again with what it read first."""
    dest, _ = push_destination(tag, insecure)
    try:
        image.send(dest, log)
    finally:
        dest.close()
    reads = record_workload(tag, json.loads(image.config), list(optimize.workload), optimize.period_s,
                            insecure=insecure, chunk_cache=optimize.chunk_cache, log=log)
    # Only new layers are rewritten; a kept base layer keeps its digest (and its place in its registry).
    prioritized = {i: paths for i, paths in reads.items() if i < len(image.layers) and not image.layers[i].kept}
    for i, paths in sorted(reads.items()):
        kind = "new, reordered" if i in prioritized else "base, kept"
        log(f"optimize: layer {i} ({kind}): {len(paths)} files read by the workload")
    image.close()
    return build_image(result, spec.compression, prioritized=prioritized, source_date_epoch=source_date_epoch,
                       insecure=insecure, log=log)
