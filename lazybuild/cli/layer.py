"""`lazybuild layer convert|verify|ls|extract`: single eStargz layers as files."""

from __future__ import annotations

import os
import stat
import sys

from .. import estargz
from . import output, texts
from .options import parse_size, read_prioritized_files
from .progress import progress_bar


def add_parser(sub) -> None:
    layer = sub.add_parser("layer", help="convert, verify, list and extract single eStargz layers")
    lsub = layer.add_subparsers(dest="layer_command", required=True)

    c = lsub.add_parser("convert", help="tar (plain, gzip or zstd) -> eStargz; prints the blob's digests (all of its descriptor with --format json)")
    c.add_argument("input", metavar="IN.tar", help="input tar, plain/gzip/zstd, or - for stdin")
    c.add_argument("output", metavar="OUT", help="output blob (written under a temporary name, then renamed)")
    c.add_argument("--estargz", action="store_const", dest="format", const="estargz", default="estargz",
                   help="eStargz with gzip (the default)")
    c.add_argument("--zstdchunked", action="store_const", dest="format", const="zstdchunked",
                   help="eStargz with zstd, zstd:chunked-compatible (application/vnd.oci.image.layer.v1.tar+zstd)")
    c.add_argument("--estargz-chunk-size", "--zstdchunked-chunk-size", type=parse_size, dest="chunk_size", metavar="N",
                   help="payload chunk size (default 4MiB)")
    c.add_argument("--estargz-compression-level", "--zstdchunked-compression-level", "--level", type=int, default=None,
                   dest="level", metavar="L", help="compression level (gzip 0-9, default 6; zstd 1-22, default 3)")
    c.add_argument("--estargz-record-in", "--zstdchunked-record-in", dest="record_in", metavar="FILE",
                   help="paths to put first, before .prefetch.landmark: the JSON lines {\"path\": ...} of "
                        "`ctr-remote image optimize` or `lazybuild mount --record`, or one path a line")
    c.add_argument("--allow-missing-prioritized", action="store_true",
                   help="warn instead of failing when a prioritized path is not in the layer")
    # Deprecated spellings, kept for a release; each prints one line naming the new one.
    c.add_argument("--zstd", action="store_true", dest="old_zstd", help="deprecated: --zstdchunked")
    c.add_argument("--chunk-size", type=parse_size, dest="old_chunk_size", metavar="N", help="deprecated: --estargz-chunk-size")
    c.add_argument("--prioritized-files", dest="old_prioritized_files", metavar="FILE", help="deprecated: --estargz-record-in")
    c.set_defaults(func=convert)

    v = lsub.add_parser("verify", help="check the TOC digest and every chunk digest; exit 0 only if all verify")
    v.add_argument("blob", metavar="BLOB")
    v.add_argument("--toc-digest", metavar="D", help="expected TOC digest (the containerd.io/snapshot/stargz/toc.digest annotation)")
    v.set_defaults(func=verify)

    ls = lsub.add_parser("ls", help="list TOC entries")
    ls.add_argument("blob", metavar="BLOB")
    ls.add_argument("--json", action="store_true", help="deprecated: --format json (a JSON array of the entries, with their compressed byte ranges)")
    ls.add_argument("--chunks", action="store_true", help="also list chunk entries")
    ls.set_defaults(func=list_entries)

    x = lsub.add_parser("extract", help="unpack a layer into a directory (every byte verified)")
    x.add_argument("blob", metavar="BLOB")
    x.add_argument("dir", metavar="DIR")
    x.add_argument("--toc-digest", metavar="D", help="refuse the layer unless its TOC has this digest")
    x.set_defaults(func=extract)


def convert(args) -> int:
    from .image import deprecated

    if args.old_zstd:
        deprecated("`layer convert --zstd`", "--zstdchunked (eStargz with zstd; the same layer as before)")
        args.format = "zstdchunked"
    if args.old_chunk_size is not None:
        deprecated("--chunk-size", "--estargz-chunk-size")
        args.chunk_size = args.chunk_size or args.old_chunk_size
    if args.old_prioritized_files is not None:
        deprecated("--prioritized-files", "--estargz-record-in")
        args.record_in = args.record_in or args.old_prioritized_files
    prioritized = read_prioritized_files(args.record_in) if args.record_in else []
    update, close = progress_bar(os.path.basename(args.input))
    try:
        blob = estargz.convert_file(
            args.input,
            args.output,
            compression="zstd" if args.format == "zstdchunked" else "gzip",
            level=args.level,
            chunk_size=args.chunk_size or estargz.DEFAULT_CHUNK_SIZE,
            prioritized_files=prioritized,
            allow_prioritized_not_found=args.allow_missing_prioritized,
            progress=update,
        )
    finally:
        close()
    for path in blob.missed_prioritized:
        print(f"lazybuild: warning: prioritized file {path!r} is not in the layer", file=sys.stderr)
    output.emit(args, output.Result(blob.to_json(), texts.blob(blob.to_json()), primary=blob.digest))
    return 0


def verify(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r:
        files = r.verify(args.toc_digest)
        output.emit(args, output.Result({"blob": args.blob, "kind": r.kind, "entries": len(r.entries), "filesVerified": files, "tocDigest": r.toc_digest},
                                        f"ok: {args.blob}: {r.kind} eStargz, {len(r.entries)} TOC entries, {files} files verified, TOC {r.toc_digest}"))
    if not args.toc_digest:
        print("lazybuild: note: no --toc-digest given: chunks were checked against the TOC, the TOC against nothing", file=sys.stderr)
    return 0


def _mode_string(e: estargz.TOCEntry) -> str:
    kind = {"dir": "d", "symlink": "l", "char": "c", "block": "b", "fifo": "p", "hardlink": "h"}.get(e.type, "-")
    return kind + stat.filemode(e.mode & 0o7777)[1:]


def list_entries(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r, output.Listing(args) as listing:
        for e in r.entries:
            if e.type == "chunk" and not args.chunks:
                continue
            if listing.as_json:
                d = e.to_go_dict()
                d["path"] = e.path
                if e.is_payload():
                    d["compressedRange"] = list(r.compressed_range(e))
                listing.add(d, "")
                continue
            owner = f"{e.user_name or e.uid}:{e.group_name or e.gid}"
            size = f"{e.dev_major},{e.dev_minor}" if e.type in ("char", "block") else str(e.chunk_size if e.type == "chunk" else e.size)
            name = e.path + ("/" if e.type == "dir" and e.path else "")
            link = f" -> {e.link_name}" if e.type == "symlink" else f" link to {e.link_name}" if e.type == "hardlink" else ""
            extra = f" @{e.chunk_offset}" if e.type == "chunk" else ""
            listing.add(None, f"{_mode_string(e)} {owner:>15} {size:>10} {name or '.'}{link}{extra}")
    return 0


def extract(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r:
        if args.toc_digest:
            r.verify_toc(args.toc_digest)
        warnings = estargz.extract(r, args.dir)
    for w in warnings:
        print(f"lazybuild: warning: {w}", file=sys.stderr)
    return 0
