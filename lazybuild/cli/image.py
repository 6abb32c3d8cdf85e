"""`lazybuild pull|push|convert|inspect`: whole images between registries, OCI layouts and docker-archives."""

from __future__ import annotations

import json
import sys

from .. import estargz
from ..errors import DataError
from .options import parse_size, platform_of, read_prioritized_files
from .progress import progress_bar

LOCATION_HELP = "a registry reference (host[:port]/repo[:tag|@digest]), oci:DIR[:TAG] or docker-archive:FILE"


def add_parser(sub) -> None:
    for name, func, helptext in (("pull", copy, "copy an image from a registry into an OCI layout"),
                                 ("push", copy, "copy an image (OCI layout, docker-archive) to a registry"),
                                 ("convert", convert, "turn every layer of an image into eStargz (or zstd)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("src", metavar="SRC", help=LOCATION_HELP)
        c.add_argument("dst", metavar="DST", help=LOCATION_HELP)
        c.add_argument("--platform", metavar="P", help="os/arch[/variant] to take from a multi-platform image (default: this machine's)")
        c.add_argument("--all-platforms", action="store_true", help="every platform of a multi-platform image")
        c.add_argument("--insecure", action="store_true", help="skip TLS verification (plain HTTP is automatic for loopback registries)")
        if name == "convert":
            c.add_argument("--zstd", action="store_true", help="eStargz with zstd instead of gzip")
            c.add_argument("--chunk-size", type=parse_size, default=estargz.DEFAULT_CHUNK_SIZE, metavar="N")
            c.add_argument("--prioritized-files", metavar="FILE", help="paths to put first in every layer that holds them")
            c.add_argument("--force", action="store_true", help="convert layers that already are eStargz too")
        c.set_defaults(func=func)


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="print the manifest and config of an image in a registry as JSON")
    i.add_argument("ref", metavar="REF")
    i.add_argument("--platform", metavar="P")
    i.add_argument("--insecure", action="store_true")
    i.set_defaults(func=inspect)


def _log(message: str) -> None:
    print(f"lazybuild: {message}", file=sys.stderr)


def copy(args, convert=None) -> int:
    """`pull` and `push` (and `convert`, with CONVERT): SRC -> DST, layer by layer."""
    from ..transfer import Location, copy_image, open_dest, open_source

    src_loc, dst_loc = Location.parse(args.src), Location.parse(args.dst)
    mount_from = src_loc.ref.repository if src_loc.kind == dst_loc.kind == "registry" and src_loc.ref.host == dst_loc.ref.host else None
    src = open_source(src_loc, args.insecure)
    try:
        dst = open_dest(dst_loc, args.insecure, mount_from)
        try:
            def layer_progress(label):
                update, close = progress_bar(label)
                return update  # bars are transient (leave=False): closing at exit is enough
            digest = copy_image(src, dst, platform=platform_of(args), all_platforms=getattr(args, "all_platforms", False),
                                convert=convert, log=_log, layer_progress=layer_progress)
        finally:
            dst.close()
    finally:
        src.close()
    print(json.dumps({"source": str(src_loc), "destination": str(dst_loc), "digest": digest}))
    return 0


def convert(args) -> int:
    from ..transfer import ConvertOptions

    prioritized = read_prioritized_files(args.prioritized_files) if args.prioritized_files else None
    return copy(args, ConvertOptions("zstd" if args.zstd else "gzip", args.chunk_size, prioritized, args.force))


def inspect(args) -> int:
    from ..registry import Reference, Registry

    ref = Reference.parse(args.ref[len("docker://"):] if args.ref.startswith("docker://") else args.ref)
    with Registry(ref.host, insecure=args.insecure) as reg:
        resolved = reg.resolve(ref, platform_of(args))
        raw_config = reg.read_blob(ref.repository, resolved.manifest.config.digest, size=resolved.manifest.config.size)
    try:
        config = json.loads(raw_config)
    except ValueError as e:  # its digest matched, so the image itself is broken
        raise DataError(f"{ref}: config {resolved.manifest.config.digest} is not JSON ({e})") from None
    out = {"reference": str(ref), "digest": resolved.manifest.digest, "manifest": json.loads(resolved.manifest.raw),
           "config": config}
    if resolved.index is not None:
        out["index"] = json.loads(resolved.index.raw)
    print(json.dumps(out, indent=2))
    return 0
