"""`lazybuild copy|pull|push|convert|inspect`: whole images between registries, OCI layouts (directories and
tars) and docker-archives, every argument in the one reference syntax of `transfer.Location`."""

from __future__ import annotations

import json
import logging
import sys

from .. import estargz
from ..errors import DataError, UsageError
from . import output, texts
from .options import parse_size, platform_of, read_prioritized_files
from .progress import progress_bar

LOCATION_HELP = ("docker://HOST/REPO[:TAG|@DIGEST] (or HOST/REPO[:TAG] alone), oci:DIR[:TAG|@DIGEST], "
                 "oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or dir:DIR")

# verb -> (what SRC must be, what DST must be): True a registry, False local, None either.
DIRECTIONS = {"copy": (None, None), "pull": (True, False), "push": (False, True), "convert": (None, None)}


def add_parser(sub) -> None:
    for name, func, helptext in (
            ("copy", copy, "copy an image from anywhere to anywhere (registry, OCI layout or tar, docker-archive, dir)"),
            ("pull", copy, "copy an image from a registry into an OCI layout, an OCI tar, a docker-archive or a dir"),
            ("push", copy, "copy an image from an OCI layout, an OCI tar, a docker-archive or a dir to a registry"),
            ("convert", convert, "copy an image turning its layers into eStargz (default), zstd:chunked or zstd")):
        c = sub.add_parser(name, help=helptext, description=helptext + ". Images are " + LOCATION_HELP + ".")
        c.add_argument("src", metavar="SRC", help=LOCATION_HELP)
        c.add_argument("dst", metavar="DST", help=LOCATION_HELP)
        c.add_argument("--platform", metavar="P", help="os/arch[/variant] to take from a multi-platform image (default: this machine's)")
        c.add_argument("--all-platforms", action="store_true", help="every platform of a multi-platform image")
        c.add_argument("--insecure", action="store_true", help="skip TLS verification (plain HTTP is automatic for loopback registries)")
        if name == "convert":
            add_convert_flags(c)
        c.set_defaults(func=func, verb=name)


def add_convert_flags(c) -> None:
    """nerdctl's `image convert` names (where we do the same thing), and the old ones as deprecated aliases."""
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--estargz", action="store_const", dest="format", const="estargz",
                      help="eStargz layers with gzip (the default)")
    kind.add_argument("--zstdchunked", action="store_const", dest="format", const="zstdchunked",
                      help="eStargz layers with zstd (zstd:chunked-compatible, application/vnd.oci.image.layer.v1.tar+zstd)")
    kind.add_argument("--zstd", action="store_const", dest="format", const="zstd",
                      help="plain zstd layers, not eStargz, as nerdctl's --zstd (before this release --zstd meant "
                           "what --zstdchunked means now)")
    c.set_defaults(format="estargz")
    c.add_argument("--estargz-compression-level", type=int, metavar="L", help="gzip level of eStargz layers (0-9, default 6)")
    c.add_argument("--zstdchunked-compression-level", type=int, metavar="L", help="zstd level of zstd:chunked layers (1-22, default 3)")
    c.add_argument("--zstd-compression-level", type=int, metavar="L", help="zstd level of plain zstd layers (1-22, default 3)")
    c.add_argument("--estargz-chunk-size", "--zstdchunked-chunk-size", type=parse_size, dest="chunk_size", metavar="N",
                   help=f"payload chunk size of eStargz and zstd:chunked layers (default {estargz.DEFAULT_CHUNK_SIZE >> 20}MiB)")
    c.add_argument("--estargz-record-in", "--zstdchunked-record-in", dest="record_in", metavar="FILE",
                   help="paths to put first in every layer that holds them (before .prefetch.landmark): the JSON lines "
                        "{\"path\": ...} `ctr-remote image optimize` and `lazybuild mount --record` write, or one path a line")
    c.add_argument("--oci", action="store_true",
                   help="OCI media types: accepted for nerdctl's sake and changes nothing, as converted images always "
                        "get OCI media types (layer annotations need an OCI manifest); layers kept as they are keep theirs")
    c.add_argument("--force", action="store_true", help="convert layers that already are in the chosen format too")
    # Deprecated spellings, kept for a release; each prints one line naming the new one.
    c.add_argument("--chunk-size", type=parse_size, dest="old_chunk_size", metavar="N", help="deprecated: --estargz-chunk-size")
    c.add_argument("--prioritized-files", dest="old_prioritized_files", metavar="FILE", help="deprecated: --estargz-record-in")


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="print an image's digest, platform and layers (its manifest and config with --format json)")
    i.add_argument("ref", metavar="IMAGE", help=LOCATION_HELP)
    i.add_argument("--platform", metavar="P")
    i.add_argument("--insecure", action="store_true")
    i.set_defaults(func=inspect)


def _log(message: str) -> None:
    logging.getLogger(__name__).info(message)  # `lazybuild: MESSAGE`, as --log-level allows


def deprecated(old: str, new: str) -> None:
    print(f"lazybuild: warning: {old} is deprecated and goes in a later release: use {new}", file=sys.stderr)


def check_direction(verb: str, src, dst) -> None:
    """`pull` goes from a registry, `push` to one: the other way round is a mistake, said with the verb to use."""
    want_src, want_dst = DIRECTIONS.get(verb, (None, None))
    if want_src is True and not src.is_registry:
        if dst.is_registry:
            raise UsageError(f"pull copies from a registry, and {src} is a local image: to send it to {dst}, "
                             f"use `lazybuild push {src} {dst}`", hint="`lazybuild copy SRC DST` copies either way")
        raise UsageError(f"pull copies from a registry, and {src} is a local image: use `lazybuild copy {src} {dst}`")
    if want_dst is False and dst.is_registry:
        raise UsageError(f"pull copies into a local OCI layout or archive, and {dst} is a registry: to copy between "
                         f"registries use `lazybuild copy {src} {dst}`",
                         hint=f"to pull into a directory, name it oci:DIR (e.g. `lazybuild pull {src} oci:./image`)")
    if want_src is False and src.is_registry:
        if not dst.is_registry:
            raise UsageError(f"push copies a local image to a registry, and {src} is in a registry: to bring it here, "
                             f"use `lazybuild pull {src} {dst}`", hint="`lazybuild copy SRC DST` copies either way")
        raise UsageError(f"push copies a local image to a registry, and {src} is in a registry: to copy between "
                         f"registries use `lazybuild copy {src} {dst}`")
    if want_dst is True and not dst.is_registry:
        raise UsageError(f"push copies to a registry, and {dst} is a local image: use `lazybuild copy {src} {dst}`")


def copy(args, convert=None) -> int:
    """`copy`, `pull` and `push` (and `convert`, with CONVERT): SRC -> DST, layer by layer."""
    from ..transfer import Location

    src_loc, dst_loc = Location.parse(args.src), Location.parse(args.dst)
    check_direction(args.verb, src_loc, dst_loc)
    digest = copy_between(src_loc, dst_loc, args, convert)
    copied = {"source": str(src_loc), "destination": str(dst_loc), "digest": digest}
    output.emit(args, output.Result(copied, texts.copied(copied), primary=digest))
    return 0


def copy_between(src_loc, dst_loc, args, convert=None) -> str:
    """Copy (with CONVERT, convert) the image at SRC_LOC to DST_LOC; the digest of what was recorded."""
    from ..transfer import copy_image, open_dest, open_source

    same_registry = src_loc.is_registry and dst_loc.is_registry and src_loc.ref.host == dst_loc.ref.host
    mount_from = src_loc.ref.repository if same_registry else None
    src = open_source(src_loc, args.insecure)
    try:
        dst = open_dest(dst_loc, args.insecure, mount_from)
        try:
            def layer_progress(label):
                update, close = progress_bar(label)
                return update  # bars are transient (leave=False): closing at exit is enough
            return copy_image(src, dst, platform=platform_of(args), all_platforms=getattr(args, "all_platforms", False),
                              convert=convert, log=_log, layer_progress=layer_progress)
        finally:
            dst.close()
    finally:
        src.close()


def convert_options(args):
    """The ConvertOptions the convert flags ask for (the deprecated ones said so on stderr)."""
    from ..transfer import ConvertOptions

    chunk_size, record = args.chunk_size, args.record_in
    if args.old_chunk_size is not None:
        deprecated("--chunk-size", "--estargz-chunk-size")
        chunk_size = chunk_size or args.old_chunk_size
    if args.old_prioritized_files is not None:
        deprecated("--prioritized-files", "--estargz-record-in")
        record = record or args.old_prioritized_files
    levels = {"estargz": args.estargz_compression_level, "zstdchunked": args.zstdchunked_compression_level,
              "zstd": args.zstd_compression_level}
    for kind, level in levels.items():
        if level is not None and kind != args.format:
            raise UsageError(f"--{kind}-compression-level is for --{kind} layers, and this conversion makes "
                             f"{args.format} layers")
    if args.format == "zstd" and (chunk_size or record):
        raise UsageError("plain zstd layers (--zstd) have no chunks or prioritized files: --estargz-chunk-size and "
                         "--estargz-record-in are for --estargz and --zstdchunked")
    if args.format == "zstd":
        print("lazybuild: warning: --zstd now means plain zstd layers (not eStargz), as nerdctl's --zstd; eStargz "
              "with zstd, what --zstd meant before, is --zstdchunked", file=sys.stderr)
    return ConvertOptions(args.format, levels[args.format], chunk_size or estargz.DEFAULT_CHUNK_SIZE,
                          read_prioritized_files(record) if record else None, force=args.force)


def convert(args) -> int:
    return copy(args, convert_options(args))


def inspect(args) -> int:
    from ..transfer import Location

    loc = Location.parse(args.ref)
    if loc.is_registry:
        out = _inspect_registry(loc.ref, args)
    else:
        out = _inspect_local(loc, args)
    output.emit(args, output.Result(out, texts.image(out), primary=out["digest"]))
    return 0


def _config_json(raw: bytes, where: str, digest: str) -> dict:
    try:
        return json.loads(raw)
    except ValueError as e:  # its digest matched, so the image itself is broken
        raise DataError(f"{where}: config {digest} is not JSON ({e})") from None


def _inspect_registry(ref, args) -> dict:
    from ..registry import Registry

    with Registry(ref.host, insecure=args.insecure) as reg:
        resolved = reg.resolve(ref, platform_of(args))
        raw_config = reg.read_blob(ref.repository, resolved.manifest.config.digest, size=resolved.manifest.config.size)
    out = {"reference": str(ref), "digest": resolved.manifest.digest, "manifest": json.loads(resolved.manifest.raw),
           "config": _config_json(raw_config, str(ref), resolved.manifest.config.digest)}
    if resolved.index is not None:
        out["index"] = json.loads(resolved.index.raw)
    return out


def _inspect_local(loc, args) -> dict:
    from ..transfer import read_image

    manifest, raw_config = read_image(loc, platform_of(args))
    return {"reference": str(loc), "digest": manifest.digest, "manifest": json.loads(manifest.raw),
            "config": _config_json(raw_config, str(loc), manifest.config.digest)}
