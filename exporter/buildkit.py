"""The export step BuildKit runs inside a build (`LAZYBUILD_OUTPUT=stargz`):

    python -m lazybuild.exporter.buildkit --states /lazybuild/states --meta /lazybuild/meta/export.json --out /out

The frontend mounts the target stage's states read-only, one per layer step (`0` is the base), and a
JSON file with the image config and the options. Each step's change from the previous state becomes an
eStargz (gzip or zstd) layer; the base becomes one layer of its own; the OCI image layout (blobs,
index.json with the tag, oci-layout) is written to the output mount, which is the build's result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from lazybuild.estargz import convert_file
from lazybuild.image import OCI_CONFIG, Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.layout import OCILayout

from .tree_diff import write_diff


def fetch_base(layout: OCILayout, base: dict) -> tuple[list[Descriptor], list[str]]:
    """The base image's layer blobs into the layout; (their descriptors, their diff_ids)."""
    import json as _json

    from lazybuild.image import Platform
    from lazybuild.registry import Reference, Registry

    ref = Reference.parse(f"{base['repository']}@{base['digest']}")
    registry = Registry(ref.host)
    resolved = registry.resolve(ref, Platform.parse(base["platform"]))
    config = _json.loads(registry.read_blob(ref.repository, resolved.manifest.config.digest,
                                           size=resolved.manifest.config.size))
    for d in resolved.manifest.layers:
        if not layout.has_blob(d.digest):
            layout.write_blob(d.digest, lambda out, d=d: registry.fetch_blob(ref.repository, d.digest, out))
    return list(resolved.manifest.layers), list(config.get("rootfs", {}).get("diff_ids") or [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lazybuild-export")
    ap.add_argument("--states", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.meta) as f:
        meta = json.load(f)
    count = int(meta["states"])
    prioritized = []
    if meta.get("prioritized"):
        with open(meta["prioritized"]) as f:
            prioritized = [line.strip() for line in f if line.strip()]
    # Blobs are written beside the layout and renamed into it (same filesystem), the work dir removed.
    work = tempfile.mkdtemp(prefix=".lazybuild-export-", dir=args.out)
    layout = OCILayout(args.out, create=True)
    descs, diff_ids = [], []
    epoch = meta.get("sourceDateEpoch")
    prev = None
    base = meta.get("base")
    if base:  # keep the base image's own layers: fetched by digest from its registry
        descs, diff_ids = fetch_base(layout, base)
        prev = os.path.join(args.states, "0")
        print(f"base {base['repository']}@{base['digest']}: {len(descs)} layers kept", file=sys.stderr)
    for i in range(count):
        if i == 0 and base:
            continue
        state = os.path.join(args.states, str(i))
        if i == 0 and meta.get("baseEmpty"):
            continue  # FROM scratch: the first step's layer is all it made
        tar = os.path.join(work, f"{i}.tar")
        n = write_diff(prev, state, tar, epoch)
        blob_path = os.path.join(work, f"{i}.blob")
        # The prioritized files (a list in the context) lead the layers that hold them.
        blob = convert_file(tar, blob_path, compression=meta.get("compression", "gzip"),
                            prioritized_files=prioritized, allow_prioritized_not_found=True)
        os.unlink(tar)
        layout.adopt_blob(blob.digest, blob_path)
        descs.append(Descriptor(blob.media_type, blob.digest, blob.size, annotations=dict(blob.annotations)))
        diff_ids.append(blob.diff_id)
        print(f"layer {len(descs) - 1}: {n} entries, {blob.size} bytes {blob.digest}", file=sys.stderr)
        prev = state
    config = dict(meta["config"])
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    # The base image's own history entries describe layers it no longer has separately: they become
    # empty, and one entry stands for the base layer; the Dockerfile's entries keep their layers.
    history = [dict(h) for h in config.get("history") or []]
    ours = [h for h in history if h.get("comment") == "buildkit.dockerfile.v0"]
    base_history = [dict(h, empty_layer=True) for h in history if h.get("comment") != "buildkit.dockerfile.v0"]
    if meta.get("base"):  # its layers are kept: so is its history
        base_history = [dict(h) for h in history if h.get("comment") != "buildkit.dockerfile.v0"]
    elif not meta.get("baseEmpty"):
        base_history.append({"created_by": "lazybuild: the base image as one eStargz layer", "comment": "lazybuild.exporter"})
    config["history"] = base_history + ours
    raw = canonical_json(config)
    layout.put_bytes(raw)
    manifest = Manifest.build(Descriptor(OCI_CONFIG, sha256_digest(raw), len(raw)), descs)
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), meta.get("tag") or "latest")
    shutil.rmtree(work, ignore_errors=True)
    print(f"OCI layout with {len(descs)} eStargz layers: {manifest.digest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
