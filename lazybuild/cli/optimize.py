"""`lazybuild optimize SRC DST [--period S] [-- CMD ARGS]`: an existing image reordered by what its workload reads
first, as `ctr-remote image optimize` does: SRC mounted lazily with access recording, the workload (the image's
ENTRYPOINT/CMD, or CMD after `--`) run under runc for the period, every layer converted to eStargz with the
files it read first put before `.prefetch.landmark`, the result written to DST."""

from __future__ import annotations

import json
import logging

from .. import estargz
from ..defaults import CACHE_DIR
from ..errors import DataError, UsageError, require_extra
from .image import LOCATION_HELP, copy_between
from . import output, texts
from .options import parse_size, platform_of


def add_parser(sub) -> None:
    o = sub.add_parser("optimize", help="reorder an image's layers by what its workload reads first (ctr-remote image optimize)",
                       description="Mount SRC lazily, run its workload under runc for --period seconds recording the "
                                   "files it reads, and write SRC to DST with every layer converted to eStargz, those "
                                   "files first (before .prefetch.landmark). The workload is the image's ENTRYPOINT "
                                   "and CMD, or the command after `--`. Images are " + LOCATION_HELP + ".")
    o.add_argument("src", metavar="SRC", help=LOCATION_HELP)
    o.add_argument("dst", metavar="DST", help=LOCATION_HELP)
    o.add_argument("--period", type=float, default=10.0, metavar="S",
                   help="how long the workload runs before it is stopped (default 10 s, as ctr-remote)")
    o.add_argument("--platform", metavar="P", help="os/arch[/variant] to take from a multi-platform image (default: this machine's)")
    o.add_argument("--insecure", action="store_true", help="skip TLS verification (plain HTTP is automatic for loopback registries)")
    o.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable of the workload (repeatable; over the image's)")
    o.add_argument("--cwd", metavar="DIR", help="the workload's working directory (default the image's WorkingDir)")
    o.add_argument("--user", metavar="USER[:GROUP]", help="the workload's user (default the image's User)")
    o.add_argument("--zstdchunked", action="store_true", help="eStargz with zstd instead of gzip")
    o.add_argument("--estargz-compression-level", "--zstdchunked-compression-level", type=int, dest="level", metavar="L",
                   help="compression level (gzip 0-9, default 6; zstd 1-22, default 3)")
    o.add_argument("--estargz-chunk-size", type=parse_size, default=estargz.DEFAULT_CHUNK_SIZE, dest="chunk_size",
                   metavar="N", help="payload chunk size (default 4MiB)")
    o.add_argument("--record-out", metavar="FILE",
                   help="also write the files read, as JSON lines {\"path\", \"layer\"} (what --estargz-record-in takes)")
    o.add_argument("--cache", metavar="DIR", default=CACHE_DIR, help="the lazy mount's chunk cache")
    o.set_defaults(func=optimize, workload=[])


def _log(message: str) -> None:
    logging.getLogger(__name__).info(message)  # `lazybuild: MESSAGE`, as --log-level allows


def optimize(args) -> int:
    from ..transfer import ConvertOptions, Location

    src_loc, dst_loc = Location.parse(args.src), Location.parse(args.dst)
    if args.period <= 0:
        raise UsageError(f"--period {args.period:g}: the workload needs a positive number of seconds")
    require_extra("pyfuse3", "lazybuild optimize")  # the workload runs on a lazy mount: said before any work
    for item in args.env:
        if not item.partition("=")[0] or "=" not in item:
            raise UsageError(f"--env {item!r}: write it KEY=VALUE")
    config, digest = _image_config(src_loc, args)
    config = _with_run_options(config, args)
    if src_loc.is_registry:  # the image measured is the image converted, even if the tag moves meanwhile
        src_loc = Location(src_loc.kind, ref=src_loc.ref.with_digest(digest))
    reads = _record(src_loc, config, args)
    for i, paths in sorted(reads.items()):
        _log(f"optimize: layer {i}: {len(paths)} files read by the workload")
    if args.record_out:
        _write_record(args.record_out, reads)
    convert = ConvertOptions("zstdchunked" if args.zstdchunked else "estargz", args.level, args.chunk_size,
                             force=True, prioritized_by_layer=reads)
    digest = copy_between(src_loc, dst_loc, args, convert)
    optimized = {"source": str(src_loc), "destination": str(dst_loc), "digest": digest,
                 "filesRead": {str(i): len(p) for i, p in sorted(reads.items())}}
    output.emit(args, output.Result(optimized, texts.copied(optimized), primary=digest))
    return 0


def _image_config(loc, args) -> tuple[dict, str]:
    """The image's config, and its manifest's digest (of the platform chosen)."""
    from ..transfer import read_image

    manifest, raw = read_image(loc, platform_of(args), args.insecure)
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{loc}: its config is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{loc}: its config is not a JSON object")
    return config, manifest.digest


def _with_run_options(config: dict, args) -> dict:
    """CONFIG with --env, --cwd and --user put over the image's Env, WorkingDir and User (for the run only)."""
    run = dict(config.get("config") or {})
    if args.env:
        names = {item.partition("=")[0] for item in args.env}
        run["Env"] = [e for e in run.get("Env") or [] if e.partition("=")[0] not in names] + list(args.env)
    if args.cwd:
        run["WorkingDir"] = args.cwd
    if args.user:
        run["User"] = args.user
    return {**config, "config": run}


def _record(loc, config: dict, args) -> dict[int, list[str]]:
    """Mount LOC (a registry's image as it is; a local one served on loopback) and record its workload's reads."""
    from lazybuild.exporter.optimize import record_workload

    if loc.is_registry:
        return record_workload(str(loc.ref), config, args.workload, args.period, insecure=args.insecure,
                               chunk_cache=args.cache, log=_log, platform=platform_of(args))
    from ..localregistry import LocalRegistry
    from ..transfer import LocalImage

    with LocalImage(loc, platform_of(args)) as image, LocalRegistry(image.layout, image.manifest) as registry:
        return record_workload(registry.reference, config, args.workload, args.period, chunk_cache=args.cache,
                               log=_log)


def _write_record(path: str, reads: dict[int, list[str]]) -> None:
    from ..layout import write_atomic

    lines = [json.dumps({"path": p, "layer": i}) for i, paths in sorted(reads.items()) for p in paths]
    write_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")
