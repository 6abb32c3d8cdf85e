"""`lazybuild mount|umount`: an image's root filesystem, mounted lazily with FUSE."""

from __future__ import annotations

import os
import sys
import tempfile

from ..defaults import CACHE_DIR
from ..errors import MountError, UsageError, require_extra
from . import output, texts
from .options import parse_size, platform_of


def add_parser(sub) -> None:
    mnt = sub.add_parser("mount", help="mount an image's root filesystem lazily (FUSE, read-only)")
    mnt.add_argument("ref_or_dir", metavar="IMAGE",
                     help="a registry reference, oci:DIR[:TAG|@DIGEST], oci-archive:FILE[:TAG], docker-archive:FILE or "
                          "dir:DIR (with --status: the mount point)")
    mnt.add_argument("dir", metavar="DIR", nargs="?")
    mnt.add_argument("--platform", metavar="P")
    mnt.add_argument("--cache", metavar="DIR", default=CACHE_DIR,
                     help="chunk cache shared by all mounts (default %(default)s, $LAZYBUILD_CACHE)")
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
    mnt.set_defaults(func=mount)

    um = sub.add_parser("umount", help="unmount a lazybuild mount")
    um.add_argument("dir", metavar="DIR")
    um.set_defaults(func=umount)


def mount(args) -> int:
    from .. import mounter

    if args.status:
        status = mounter.status(args.ref_or_dir)
        output.emit(args, output.Result(status, texts.mount_status(status)))
        return 0
    if not args.dir:
        raise UsageError("mount needs REF and DIR (or --status DIR)")
    from ..transfer import Location

    loc = Location.parse(args.ref_or_dir)  # a bad image argument is said before anything else is checked
    require_extra("pyfuse3", "lazybuild mount")
    opts = mounter.MountOptions(platform=platform_of(args), cache_dir=args.cache, cache_limit_bytes=args.cache_limit,
                                prefetch=not args.no_prefetch, background_fetch=not args.no_background_fetch,
                                verify=not args.insecure_skip_verify, record=args.record, insecure=args.insecure,
                                timeout_s=args.timeout, layers=args.layers)
    if loc.is_registry:
        if args.daemon:  # a child in its own session serves; we return once it does
            mounter.mount_image(str(loc.ref), args.dir, opts, detach=True)
            return 0
        return mounter.serve(str(loc.ref), args.dir, opts)
    return mount_local(loc, args.dir, opts, args.daemon)


def mount_local(loc, mountpoint: str, opts, daemon: bool) -> int:
    """A layout or an archive: served on loopback as a registry of one image (lazybuild.localregistry), so the
    mount reads its blobs through the same engine as a registry's, lazily and verified. The registry lives
    in the process that serves the mount (with --daemon, a child in its own session)."""
    from .. import mounter
    from ..localregistry import LocalRegistry
    from ..transfer import LocalImage

    image = LocalImage(loc, opts.platform)  # unpacked or copied here, so that its errors reach the terminal
    if not daemon:
        try:
            with LocalRegistry(image.layout, image.manifest) as registry:
                return mounter.serve(registry.reference, mountpoint, opts)
        finally:
            image.close()
    fd, log_path = tempfile.mkstemp(prefix="lazybuild-mount-", suffix=".log")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: serve until unmounted, then remove what LocalImage made; never return
        code = 1
        try:
            os.setsid()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            with LocalRegistry(image.layout, image.manifest) as registry:
                code = mounter.serve(registry.reference, mountpoint, opts)
        except BaseException as e:  # noqa: BLE001 - reported in the log the parent reads
            print(f"lazybuild: error: {e}", file=sys.stderr, flush=True)
        finally:
            image.close()
            os._exit(code)
    os.close(fd)
    mounted = mounter.MountedImage(mountpoint, pid, log_path, detach=True)
    try:
        mounted.wait_until_mounted()
    except OSError as e:
        raise MountError(f"cannot mount {loc}: {e}") from None
    finally:
        os.unlink(log_path)
    return 0


def umount(args) -> int:
    from .. import mounter

    mounter.umount(args.dir)
    return 0
