"""The `lazybuild` command line. Subcommands print results on stdout and people-facing errors on stderr."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys

from .. import __version__
from .. import estargz

_SIZE_RE = re.compile(r"^(\d+)\s*([KMG]i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(text: str) -> int:
    """`4194304`, `4MiB`, `512Ki` -> bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4194304 or 4MiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    size = int(m.group(1)) * _UNITS[unit]
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def read_prioritized_files(path: str) -> list[str]:
    """One path per line, or the NDJSON access record `{"path": ...}` that `lazybuild mount --record` writes."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    line = json.loads(line)["path"]
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"lazybuild: error: {path}:{lineno}: expected a path or {{\"path\": ...}}")
            out.append(line)
    return out


def _progress(label: str):
    """(callback(done, total), close) drawing a bar on a terminal; nothing in CI or when stderr is a file."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def cmd_layer_convert(args) -> int:
    prioritized = read_prioritized_files(args.prioritized_files) if args.prioritized_files else []
    update, close = _progress(os.path.basename(args.input))
    try:
        blob = estargz.convert_file(
            args.input,
            args.output,
            compression="zstd" if args.zstd else "gzip",
            level=args.level,
            chunk_size=args.chunk_size,
            prioritized_files=prioritized,
            allow_prioritized_not_found=args.allow_missing_prioritized,
            progress=update,
        )
    finally:
        close()
    for path in blob.missed_prioritized:
        print(f"lazybuild: warning: prioritized file {path!r} is not in the layer", file=sys.stderr)
    print(json.dumps(blob.to_json(), indent=None))
    return 0


def cmd_layer_verify(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r:
        files = r.verify(args.toc_digest)
        print(f"ok: {args.blob}: {r.kind} eStargz, {len(r.entries)} TOC entries, {files} files verified, TOC {r.toc_digest}")
    if not args.toc_digest:
        print("lazybuild: note: no --toc-digest given: chunks were checked against the TOC, the TOC against nothing", file=sys.stderr)
    return 0


def _mode_string(e: estargz.TOCEntry) -> str:
    kind = {"dir": "d", "symlink": "l", "char": "c", "block": "b", "fifo": "p", "hardlink": "h"}.get(e.type, "-")
    return kind + stat.filemode(e.mode & 0o7777)[1:]


def cmd_layer_ls(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r:
        for e in r.entries:
            if e.type == "chunk" and not args.chunks:
                continue
            if args.json:
                d = e.to_go_dict()
                d["path"] = e.path
                if e.is_payload():
                    d["compressedRange"] = list(r.compressed_range(e))
                print(json.dumps(d, ensure_ascii=False))
                continue
            owner = f"{e.user_name or e.uid}:{e.group_name or e.gid}"
            size = f"{e.dev_major},{e.dev_minor}" if e.type in ("char", "block") else str(e.chunk_size if e.type == "chunk" else e.size)
            name = e.path + ("/" if e.type == "dir" and e.path else "")
            link = f" -> {e.link_name}" if e.type == "symlink" else f" link to {e.link_name}" if e.type == "hardlink" else ""
            extra = f" @{e.chunk_offset}" if e.type == "chunk" else ""
            print(f"{_mode_string(e)} {owner:>15} {size:>10} {name or '.'}{link}{extra}")
    return 0


def cmd_layer_extract(args) -> int:
    with estargz.LayerReader.open_file(args.blob) as r:
        if args.toc_digest:
            r.verify_toc(args.toc_digest)
        warnings = estargz.extract(r, args.dir)
    for w in warnings:
        print(f"lazybuild: warning: {w}", file=sys.stderr)
    return 0


def _log(message: str) -> None:
    print(f"lazybuild: {message}", file=sys.stderr)


def _platform(args):
    from ..image import Platform

    return Platform.parse(args.platform) if getattr(args, "platform", None) else None


def cmd_copy(args, convert=None) -> int:
    from ..transfer import Location, copy_image, open_dest, open_source

    src_loc, dst_loc = Location.parse(args.src), Location.parse(args.dst)
    mount_from = src_loc.ref.repository if src_loc.kind == dst_loc.kind == "registry" and src_loc.ref.host == dst_loc.ref.host else None
    src = open_source(src_loc, args.insecure)
    try:
        dst = open_dest(dst_loc, args.insecure, mount_from)
        try:
            def layer_progress(label):
                update, close = _progress(label)
                return update  # bars are transient (leave=False): closing at exit is enough
            digest = copy_image(src, dst, platform=_platform(args), all_platforms=getattr(args, "all_platforms", False),
                                convert=convert, log=_log, layer_progress=layer_progress)
        finally:
            dst.close()
    finally:
        src.close()
    print(json.dumps({"source": str(src_loc), "destination": str(dst_loc), "digest": digest}))
    return 0


def cmd_convert(args) -> int:
    from ..transfer import ConvertOptions

    prioritized = read_prioritized_files(args.prioritized_files) if args.prioritized_files else None
    return cmd_copy(args, ConvertOptions("zstd" if args.zstd else "gzip", args.chunk_size, prioritized, args.force))


def cmd_inspect(args) -> int:
    from ..registry import Reference, Registry

    ref = Reference.parse(args.ref[len("docker://"):] if args.ref.startswith("docker://") else args.ref)
    with Registry(ref.host, insecure=args.insecure) as reg:
        resolved = reg.resolve(ref, _platform(args))
        config = json.loads(reg.read_blob(ref.repository, resolved.manifest.config.digest, size=resolved.manifest.config.size))
    out = {"reference": str(ref), "digest": resolved.manifest.digest, "manifest": json.loads(resolved.manifest.raw),
           "config": config}
    if resolved.index is not None:
        out["index"] = json.loads(resolved.index.raw)
    print(json.dumps(out, indent=2))
    return 0


def cmd_inspect_dockerfile(args) -> int:
    from ..dockerfile.dockerignore import DockerIgnore
    from ..dockerfile.model import load

    from .. import inroot

    context = args.context
    dockerfile = args.file or os.path.join(context, "Dockerfile")
    if args.file:  # the user's own path
        with open(dockerfile, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    else:  # a name in the context, which may link anywhere: read inside it
        data = inroot.read_file(context, "Dockerfile", 16 << 20)
        if data is None:
            raise FileNotFoundError(2, "No such file or directory", dockerfile)
        text = data.decode("utf-8", errors="surrogateescape")
    build_args = {}
    for kv in args.build_arg:
        key, has_value, value = kv.partition("=")
        if has_value:
            build_args[key] = value
        elif key in os.environ:  # `--build-arg NAME` takes the value from the environment, as docker does
            build_args[key] = os.environ[key]
    platform = args.platform or "linux/amd64"
    build = load(text, filename=dockerfile, build_args=build_args, target=args.target or "", platform=platform)
    out = build.to_json()
    out["dockerignore"] = DockerIgnore.for_dockerfile(context, dockerfile).to_json()
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def cmd_mount(args) -> int:
    from ..mounter import mount as m

    if args.status:
        print(json.dumps(m.status(args.ref_or_dir), indent=2))
        return 0
    if not args.dir:
        raise SystemExit("lazybuild: error: mount needs REF and DIR (or --status DIR)")
    import logging

    logging.basicConfig(level=logging.INFO, format="lazybuild mount: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    opts = m.MountOptions(platform=_platform(args), cache_dir=args.cache, cache_limit_bytes=args.cache_limit,
                          prefetch=not args.no_prefetch, background_fetch=not args.no_background_fetch,
                          verify=not args.insecure_skip_verify, record=args.record, insecure=args.insecure,
                          timeout_s=args.timeout, layers=args.layers)
    if args.daemon:  # a child in its own session serves; we return once it does
        m.mount_image(args.ref_or_dir, args.dir, opts, detach=True)
        return 0
    return m.serve(args.ref_or_dir, args.dir, opts)


def cmd_umount(args) -> int:
    from ..mounter import mount as m

    m.umount(args.dir)
    return 0


def cmd_snapshotter(args) -> int:
    import logging

    from ..snapshotter import config, server

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="lazybuild snapshotter: %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        raise SystemExit(f"lazybuild snapshotter: {e}")
    return server.serve(args.address, args.root, cfg, lazy_layers=not args.no_lazy)


def cmd_rpull(args) -> int:
    import grpc

    from ..snapshotter import pull

    try:
        report = pull.rpull(args.ref, args.address, args.namespace, args.snapshotter, _platform(args), args.insecure,
                            args.name)
    except pull.PullError as e:
        raise SystemExit(f"lazybuild rpull: {e}")
    except grpc.RpcError as e:
        raise SystemExit(f"lazybuild rpull: containerd at {args.address} answered {e.code().name}: {e.details()}")
    pull.main_report(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazybuild", description="Lazy container builds and starts with eStargz.")
    p.add_argument("--version", action="version", version=f"lazybuild {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    layer = sub.add_parser("layer", help="convert, verify, list and extract single eStargz layers")
    lsub = layer.add_subparsers(dest="layer_command", required=True)

    c = lsub.add_parser("convert", help="tar (plain, gzip or zstd) -> eStargz; prints the blob's digests as JSON")
    c.add_argument("input", metavar="IN.tar", help="input tar, plain/gzip/zstd, or - for stdin")
    c.add_argument("output", metavar="OUT", help="output blob (written under a temporary name, then renamed)")
    c.add_argument("--zstd", action="store_true", help="eStargz with zstd (application/vnd.oci.image.layer.v1.tar+zstd)")
    c.add_argument("--chunk-size", type=parse_size, default=estargz.DEFAULT_CHUNK_SIZE, metavar="N",
                   help="payload chunk size (default 4MiB)")
    c.add_argument("--level", type=int, default=None, metavar="L", help="compression level (gzip 0-9, default 6; zstd 1-22, default 3)")
    c.add_argument("--prioritized-files", metavar="FILE",
                   help="paths to put first, before .prefetch.landmark: one per line, or NDJSON {\"path\": ...}")
    c.add_argument("--allow-missing-prioritized", action="store_true",
                   help="warn instead of failing when a prioritized path is not in the layer")
    c.set_defaults(func=cmd_layer_convert)

    v = lsub.add_parser("verify", help="check the TOC digest and every chunk digest; exit 0 only if all verify")
    v.add_argument("blob", metavar="BLOB")
    v.add_argument("--toc-digest", metavar="D", help="expected TOC digest (the containerd.io/snapshot/stargz/toc.digest annotation)")
    v.set_defaults(func=cmd_layer_verify)

    ls = lsub.add_parser("ls", help="list TOC entries")
    ls.add_argument("blob", metavar="BLOB")
    ls.add_argument("--json", action="store_true", help="one JSON object per entry, with its compressed byte range")
    ls.add_argument("--chunks", action="store_true", help="also list chunk entries")
    ls.set_defaults(func=cmd_layer_ls)

    x = lsub.add_parser("extract", help="unpack a layer into a directory (every byte verified)")
    x.add_argument("blob", metavar="BLOB")
    x.add_argument("dir", metavar="DIR")
    x.add_argument("--toc-digest", metavar="D", help="refuse the layer unless its TOC has this digest")
    x.set_defaults(func=cmd_layer_extract)
    loc_help = "a registry reference (host[:port]/repo[:tag|@digest]), oci:DIR[:TAG] or docker-archive:FILE"
    for name, func, helptext in (("pull", cmd_copy, "copy an image from a registry into an OCI layout"),
                                 ("push", cmd_copy, "copy an image (OCI layout, docker-archive) to a registry"),
                                 ("convert", cmd_convert, "turn every layer of an image into eStargz (or zstd)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("src", metavar="SRC", help=loc_help)
        c.add_argument("dst", metavar="DST", help=loc_help)
        c.add_argument("--platform", metavar="P", help="os/arch[/variant] to take from a multi-platform image (default: this machine's)")
        c.add_argument("--all-platforms", action="store_true", help="every platform of a multi-platform image")
        c.add_argument("--insecure", action="store_true", help="skip TLS verification (plain HTTP is automatic for loopback registries)")
        if name == "convert":
            c.add_argument("--zstd", action="store_true", help="eStargz with zstd instead of gzip")
            c.add_argument("--chunk-size", type=parse_size, default=estargz.DEFAULT_CHUNK_SIZE, metavar="N")
            c.add_argument("--prioritized-files", metavar="FILE", help="paths to put first in every layer that holds them")
            c.add_argument("--force", action="store_true", help="convert layers that already are eStargz too")
        c.set_defaults(func=func)
    d = sub.add_parser("inspect-dockerfile", help="print the resolved stages, instructions and image config of a Dockerfile as JSON")
    d.add_argument("context", metavar="CONTEXT", nargs="?", default=".")
    d.add_argument("-f", "--file", metavar="Dockerfile", help="default: CONTEXT/Dockerfile")
    d.add_argument("--target", metavar="T", help="the stage to build (default: the last)")
    d.add_argument("--build-arg", metavar="K=V", action="append", default=[])
    d.add_argument("--platform", metavar="P", help="target platform (default linux/amd64)")
    d.set_defaults(func=cmd_inspect_dockerfile)
    mnt = sub.add_parser("mount", help="mount an image's root filesystem lazily (FUSE, read-only)")
    mnt.add_argument("ref_or_dir", metavar="REF", help="image reference (with --status: the mount point)")
    mnt.add_argument("dir", metavar="DIR", nargs="?")
    mnt.add_argument("--platform", metavar="P")
    mnt.add_argument("--cache", metavar="DIR", default=os.environ.get("LAZYBUILD_CACHE", "/var/cache/lazybuild"),
                     help="chunk cache shared by all mounts (default /var/cache/lazybuild)")
    mnt.add_argument("--cache-limit", type=parse_size, default=10 << 30, metavar="N", help="evict past this size (default 10GiB)")
    mnt.add_argument("--no-prefetch", action="store_true", help="do not fetch [0, .prefetch.landmark) at mount")
    mnt.add_argument("--no-background-fetch", action="store_true", help="fetch only what is read")
    mnt.add_argument("--insecure-skip-verify", action="store_true", help="mount layers whose TOC digest is not in the manifest")
    mnt.add_argument("--record", metavar="FILE", help="append first accesses as NDJSON {\"path\", \"layer\"}")
    mnt.add_argument("--layers", action="store_true",
                     help="one directory per layer (0 = bottom) with overlayfs whiteouts, ready to be lowerdirs")
    mnt.add_argument("--daemon", action="store_true", help="return once mounted; serve in the background")
    mnt.add_argument("--status", action="store_true", help="print per-layer bytes fetched/cached for mount point REF")
    mnt.add_argument("--insecure", action="store_true", help="skip TLS verification of the registry")
    mnt.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per-request timeout (default 30 s)")
    mnt.set_defaults(func=cmd_mount)
    um = sub.add_parser("umount", help="unmount a lazybuild mount")
    um.add_argument("dir", metavar="DIR")
    um.set_defaults(func=cmd_umount)
    sn = sub.add_parser("snapshotter", help="serve containerd's snapshots API: eStargz layers mounted lazily "
                        "(proxy plugin `[proxy_plugins.lazybuild] type = \"snapshot\"`)")
    sn.add_argument("--address", metavar="SOCK", default="/run/lazybuild/snapshotter.sock",
                    help="unix socket to serve on (default /run/lazybuild/snapshotter.sock)")
    sn.add_argument("--root", metavar="DIR", default="/var/lib/lazybuild-snapshotter",
                    help="snapshots, metadata, kept TOCs, chunk cache, FUSE mount (default /var/lib/lazybuild-snapshotter)")
    sn.add_argument("--config", metavar="FILE", help="TOML: cache, prefetch, registry mirrors and plain-HTTP hosts")
    sn.add_argument("--no-lazy", action="store_true", help="no remote snapshots: a plain overlayfs snapshotter")
    sn.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sn.set_defaults(func=cmd_snapshotter)
    rp = sub.add_parser("rpull", help="pull an image into containerd with remote-snapshot labels, so a lazy "
                        "snapshotter (lazybuild snapshotter, stargz) serves its layers without downloading them")
    rp.add_argument("ref", metavar="REF")
    rp.add_argument("--address", "-a", metavar="SOCK", default="/run/containerd/containerd.sock",
                    help="containerd's socket (default /run/containerd/containerd.sock)")
    rp.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"))
    rp.add_argument("--snapshotter", default="lazybuild", help="containerd snapshotter to unpack into (default lazybuild)")
    rp.add_argument("--name", metavar="NAME", help="image name in containerd (default: REF)")
    rp.add_argument("--platform", metavar="P")
    rp.add_argument("--insecure", action="store_true", help="skip TLS verification of the registry")
    rp.set_defaults(func=cmd_rpull)
    i = sub.add_parser("inspect", help="print the manifest and config of an image in a registry as JSON")
    i.add_argument("ref", metavar="REF")
    i.add_argument("--platform", metavar="P")
    i.add_argument("--insecure", action="store_true")
    i.set_defaults(func=cmd_inspect)
    from .build import add_parser as add_build

    add_build(sub)
    return p


def _bounded_malloc() -> None:
    """Keep big buffers (4 MiB chunks) in mmap so freeing them returns memory to the OS.

    glibc otherwise raises its mmap threshold after the first large free and serves later chunks from
    per-thread heaps that never shrink: +20 MiB RSS on a 2 GiB layer (bench/convert.py --size 2GiB).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> int:
    from ..layout import LayoutError
    from ..registry import RegistryAuthError, RegistryError
    from ..dockerfile.parser import DockerfileError
    from ..transfer import TransferError

    _bounded_malloc()
    argv = sys.argv[1:] if argv is None else list(argv)
    workload = []
    if argv[:1] == ["build"] and "--" in argv:  # `lazybuild build ... -- CMD ARGS`: the --optimize workload
        workload = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    if workload:
        args.workload = workload
    try:
        return args.func(args)
    except BrokenPipeError:  # `lazybuild layer ls | head`: the reader has gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except estargz.EStargzError as e:
        print(f"lazybuild: error: {e}", file=sys.stderr)
        return 1
    except (RegistryError, RegistryAuthError, LayoutError, TransferError, DockerfileError, ValueError) as e:
        print(f"lazybuild: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"lazybuild: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lazybuild: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
