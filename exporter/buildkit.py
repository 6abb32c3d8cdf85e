"""The export step BuildKit runs inside a build (`LAZYBUILD_OUTPUT=stargz`), through the one export path:

    python -m lazybuild.exporter.buildkit --states /lazybuild/states --meta /lazybuild/meta/export.json --out /out

The frontend mounts the target stage's states read-only, one per layer step (`0` is the base), and a
JSON file with the image config and the options. What is particular here: each new layer's diff is the
change from the previous state to the next, found by walking both trees (BuildKit shows states, not
upper dirs); when the base image lives in a registry (resolved by the daemon to a digest) its own layers
are read by digest: eStargz ones kept as they are, the others converted to eStargz one by one (all kept
with `"convert": false`, LAZYBUILD_CONVERT_BASE=0); a base with no registry digest becomes one eStargz
layer of its own. The image goes into an OCI image layout at the output mount, which is the build's result.

The step reaches the base's registry from the daemon's host network, with no credentials: BuildKit gives
it no session, so neither the client's `docker login` nor the daemon's reach it. A base that needs them
fails here with an error that says what to do instead.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import dataclass, replace

from lazybuild import inroot
from lazybuild.estargz import EStargzError
from lazybuild.image import Descriptor, Platform
from lazybuild.layout import LayoutError
from lazybuild.registry import Reference, RegistryAuthError, RegistryError
from lazybuild.transfer import OCIDest, RegistrySource, Source, TransferError, is_estargz

from .assemble import ConvertedLayer, ExportError, KeptLayer, NewLayer, export_image
from .tree_diff import TreeDiff, _same  # _same: the test a layer tar is written with
from .workload import Workload, WorkloadError, record

# BuildKit's comment on the history entries of a Dockerfile's instructions (a base BuildKit built has it too).
DOCKERFILE_COMMENT = "buildkit.dockerfile.v0"


@dataclass(frozen=True)
class Optimize:
    """export.json's `optimize`: the workload's argv (empty: the image's ENTRYPOINT + CMD) and its period."""

    cmd: tuple[str, ...]
    period_s: float

    @classmethod
    def load(cls, meta: dict | None) -> "Optimize | None":
        if not meta:
            return None
        cmd = meta.get("cmd") or []
        if not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd):
            raise ExportError(f"export settings: optimize.cmd is not a list of strings: {cmd!r}")
        return cls(tuple(cmd), float(meta.get("period") or 10))


@dataclass(frozen=True)
class ExportSettings:
    """The frontend's export.json (written by `frontend/main.py`'s stargz_export)."""

    state_count: int  # states/0 .. states/N-1: the base, then one per layer step
    base_empty: bool  # FROM scratch: there is no states/0
    config: dict  # the image config BuildKit's frontend returns (history included, no diff_ids yet)
    compression: str = "gzip"
    tag: str = "latest"
    source_date_epoch: int | None = None
    prioritized_list: str = ""  # a file in the context naming the files that lead each new layer
    base_repository: str = ""  # set when the base's own layers are kept: HOST/REPO, its manifest digest
    base_digest: str = ""
    base_platform: str = ""
    base_convert: bool = True  # base layers that are not eStargz become eStargz (LAZYBUILD_CONVERT_BASE, default on)
    optimize: Optimize | None = None  # LAZYBUILD_OPTIMIZE: record the workload, order the layers by it
    diffs_dir: str = ""  # where the frontend mounted each step's DiffOp (diffs/I: states/I-1 -> states/I), if any

    @classmethod
    def load(cls, path: str) -> "ExportSettings":
        with open(path) as f:
            meta = json.load(f)
        base = meta.get("base") or {}
        return cls(int(meta["states"]), bool(meta.get("baseEmpty")), dict(meta["config"]),
                   meta.get("compression", "gzip"), meta.get("tag") or "latest", meta.get("sourceDateEpoch"),
                   meta.get("prioritized", ""), base.get("repository", ""), base.get("digest", ""),
                   base.get("platform", ""), base_convert=base.get("convert", True) is not False,
                   optimize=Optimize.load(meta.get("optimize")), diffs_dir=str(meta.get("diffs") or ""))


def keep_or_convert(layers: list[Descriptor], diff_ids: list[str], source: Source,
                    convert: bool) -> list[KeptLayer | ConvertedLayer]:
    """Each base layer kept when it is eStargz already or CONVERT is off, else converted from SOURCE."""
    return [KeptLayer(d, diff_id, source) if is_estargz(d) or not convert else ConvertedLayer(d, source)
            for d, diff_id in zip(layers, diff_ids)]


def base_layers(settings: ExportSettings) -> list[KeptLayer | ConvertedLayer]:
    """The base image's layers, read by digest through one shared registry source: kept when eStargz
    already (or when conversion is off), else converted."""
    ref = Reference.parse(f"{settings.base_repository}@{settings.base_digest}")
    source = RegistrySource(ref)
    try:
        manifests = source.manifests(Platform.parse(settings.base_platform), False)
        if len(manifests) != 1:
            raise ExportError(f"base {ref}: {len(manifests)} images for {settings.base_platform}, want one")
        manifest = manifests[0][0]
        diff_ids = (json.loads(source.read(manifest.config)).get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(manifest.layers):
            raise ExportError(f"base {ref}: its config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        return keep_or_convert(manifest.layers, diff_ids, source, settings.base_convert)
    except (RegistryAuthError, RegistryError) as e:
        source.close()
        if not asks_for_credentials(e):
            raise
        raise base_needs_credentials(ref, e) from None
    except BaseException:
        source.close()
        raise


def asks_for_credentials(error: BaseException | None) -> bool:
    """Whether the registry wanted credentials we lack: a challenge we could not meet (RegistryAuthError)
    or a 401/403. The registry client wraps the first in RegistryErrors, which keep it as their context."""
    while error is not None:
        if isinstance(error, RegistryAuthError) or (isinstance(error, RegistryError) and error.status in (401, 403)):
            return True
        error = error.__context__
    return False


def base_needs_credentials(ref: Reference, cause: Exception) -> ExportError:
    return ExportError(
        f"base {ref}: its registry asks for credentials, and the export step of LAZYBUILD_OUTPUT=stargz has none: "
        "it runs inside BuildKit, which hands it neither your `docker login` nor the daemon's "
        f"(the registry client said: {cause}). "
        "LAZYBUILD_CONVERT_BASE=0 does not help: the base's layers are read from the registry either way",
        hint=f"`docker pull {ref.host}/{ref.repository}` (by the tag the Dockerfile names) before the build: the "
             "daemon then builds on its own copy and the export step makes the base one eStargz layer without "
             "the registry; or copy the base to a registry the daemon's host can read without credentials; or "
             "build with `lazybuild build`, which reads the base with your docker login")


def history(settings: ExportSettings) -> list[dict]:
    """The base image's history entries describe its layers: kept with them (a converted layer is the same
    layer); when the base becomes one layer they become empty and one entry stands for that layer. The
    Dockerfile's entries keep theirs."""
    entries = [dict(h) for h in settings.config.get("history") or []]
    if settings.base_repository:
        return entries
    # The Dockerfile's entries are the last ones, from its first layer on: as many layers as there are
    # states past the base. (BuildKit's comment does not tell them apart: a base it built has it too.)
    new_layers = settings.state_count - 1  # states/0 is the base (empty for FROM scratch)
    split = len(entries)
    while new_layers > 0 and split > 0:
        split -= 1
        new_layers -= not entries[split].get("empty_layer")
    base, ours = entries[:split], entries[split:]
    base = [dict(h, empty_layer=True) for h in base]
    if not settings.base_empty:
        base.append({"created_by": "lazybuild: the base image as one eStargz layer", "comment": "lazybuild.exporter"})
    return base + ours


def _entry(root: str, rel: str) -> tuple[str, os.stat_result] | None:
    """REL's own entry in the tree ROOT (its host path and lstat), or None when it is absent or a symlink
    stands on the way (then the tree has no file of that name: the recording names real paths)."""
    host = inroot.resolve(root, rel, follow_last=False)
    if host != os.path.join(os.path.abspath(root), *rel.split("/")):
        return None
    try:
        return host, os.lstat(host)
    except OSError:
        return None


def _holds(diff: TreeDiff, rel: str) -> bool:
    """Whether the layer of DIFF writes the regular file REL: by the test its tar is written with."""
    upper = _entry(diff.upper, rel)
    if upper is None or not stat.S_ISREG(upper[1].st_mode):
        return False
    lower = _entry(diff.lower, rel) if diff.lower is not None else None
    return lower is None or not _same(lower[1], upper[1], lower[0], upper[0])


def order_by_workload(layers: list, recorded: list[str], listed: tuple[str, ...] = ()) -> list:
    """LAYERS with each new layer led by the recorded files it provides, in first-open order, then by the
    LISTED ones (LAZYBUILD_PRIORITIZED_FILES, which every new layer takes as before). A file leads the
    topmost layer that writes it: the one a lazy mount reads it from. A recorded file no new layer writes
    comes from the base: each converted base layer is led by those it holds (which base layer holds a
    file is only known while converting, so a file several of them hold leads each); base layers kept
    as they are cannot be reordered."""
    new = [i for i, layer in enumerate(layers) if isinstance(layer, NewLayer) and isinstance(layer.diff, TreeDiff)]
    per_layer: dict[int, list[str]] = {i: [] for i in new}
    from_base: list[str] = []
    for path in recorded:
        for i in reversed(new):
            if _holds(layers[i].diff, path):
                per_layer[i].append(path)
                break
        else:
            from_base.append(path)
    out = list(layers)
    for i in new:
        lead = per_layer[i]
        taken = set(lead)
        rest = [p for p in listed if p not in taken]
        out[i] = replace(layers[i], prioritized_files=tuple(lead + rest))
    for i, layer in enumerate(layers):
        if isinstance(layer, ConvertedLayer):
            out[i] = replace(layer, prioritized_files=tuple(from_base))
    return out


def export(states_dir: str, settings: ExportSettings, out_dir: str) -> str:
    prioritized: tuple[str, ...] = ()
    if settings.prioritized_list:
        with open(settings.prioritized_list) as f:
            prioritized = tuple(line.strip() for line in f if line.strip())
    layers: list[NewLayer | KeptLayer | ConvertedLayer] = []
    previous = None  # the state the next layer is a change from
    if settings.base_repository:
        layers += base_layers(settings)
        previous = os.path.join(states_dir, "0")
        converted = sum(isinstance(layer, ConvertedLayer) for layer in layers)
        print(f"base {settings.base_repository}@{settings.base_digest}: {len(layers) - converted} layers kept, "
              f"{converted} converted to eStargz", file=sys.stderr)
    for i in range(settings.state_count):
        if i == 0 and (settings.base_repository or settings.base_empty):
            continue  # kept above, or FROM scratch: the first step's layer is all it made
        state = os.path.join(states_dir, str(i))
        changed = os.path.join(settings.diffs_dir, str(i)) if settings.diffs_dir and previous is not None else None
        layers.append(NewLayer(TreeDiff(previous, state, changed), prioritized))
        previous = state
    if settings.optimize is not None:
        # The workload runs on the final filesystem before any layer is written; what it opened leads the
        # layers that hold it, then LAZYBUILD_PRIORITIZED_FILES' list.
        if previous is None:
            raise ExportError("LAZYBUILD_OPTIMIZE: the image has no filesystem to run a workload on")
        workload = Workload.from_config(settings.config, list(settings.optimize.cmd), settings.optimize.period_s)
        recorded = record(previous, workload, log=lambda line: print(line, file=sys.stderr))
        layers = order_by_workload(layers, recorded, prioritized)
        for i, layer in enumerate(layers):
            if isinstance(layer, NewLayer):
                print(f"optimize: layer {i} is led by {len(layer.prioritized_files)} files", file=sys.stderr)
    dest = OCIDest(out_dir, settings.tag)
    log = lambda line: print(line, file=sys.stderr)
    # The blobs are written beside the layout (same filesystem), so storing one in it is a rename.
    image = export_image(layers, dict(settings.config, history=history(settings)), compression=settings.compression,
                         source_date_epoch=settings.source_date_epoch, work_parent=dest.staging_dir, log=log)
    try:
        digest = image.send(dest, log)
    finally:
        image.close()
        dest.close()
    print(f"OCI layout with {len(layers)} layers: {digest}", file=sys.stderr)
    return digest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lazybuild-export")
    ap.add_argument("--states", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        export(args.states, ExportSettings.load(args.meta), args.out)
    except (ExportError, TransferError, RegistryError, RegistryAuthError, LayoutError, EStargzError, WorkloadError) as e:
        print(f"lazybuild export: error: {e}", file=sys.stderr)
        if "hint" in vars(e):  # only a hint given for this case: the classes' own speak of the lazybuild command
            print(f"lazybuild export: hint: {e.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
