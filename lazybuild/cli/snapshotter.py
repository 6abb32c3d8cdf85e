"""`lazybuild snapshotter|rpull`: containerd's snapshots API over lazy layers, and pulls that use it."""

from __future__ import annotations

import os

from ..errors import EXTRA_OF_MODULE, MissingExtra, RemoteError
from . import output
from .options import platform_of


def add_parser(sub) -> None:
    sn = sub.add_parser("snapshotter", help="serve containerd's snapshots API: eStargz layers mounted lazily "
                        "(proxy plugin `[proxy_plugins.lazybuild] type = \"snapshot\"`)")
    sn.add_argument("--address", metavar="SOCK", default="/run/lazybuild/snapshotter.sock",
                    help="unix socket to serve on (default /run/lazybuild/snapshotter.sock)")
    sn.add_argument("--root", metavar="DIR", default="/var/lib/lazybuild-snapshotter",
                    help="snapshots, metadata, kept TOCs, chunk cache, FUSE mount (default /var/lib/lazybuild-snapshotter)")
    sn.add_argument("--config", metavar="FILE", help="TOML: cache, prefetch, registry mirrors and plain-HTTP hosts; "
                    "stargz-snapshotter's config.toml keys are read too (default: /etc/lazybuild/snapshotter.toml "
                    "if it exists)")
    sn.add_argument("--no-lazy", action="store_true", help="no remote snapshots: a plain overlayfs snapshotter")
    # --log-level (debug shows each request) is the global option every command has
    sn.set_defaults(func=snapshotter)

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
    rp.set_defaults(func=rpull)


def snapshotter(args) -> int:
    from ..snapshotter import config, server

    cfg = config.load(args.config)  # before anything starts: a bad config is an InputError naming the file
    if not args.no_lazy:  # lazy layers are served by one FUSE mount
        _require_installed("pyfuse3", "lazybuild snapshotter (without --no-lazy)")
    import logging  # (configured by now)

    log = logging.getLogger("lazybuild.snapshotter")
    if cfg.path:
        log.info("config %s", cfg.path)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    return server.serve(args.address, args.root, cfg, lazy_layers=not args.no_lazy)


def _require_installed(module: str, command: str) -> None:
    """MissingExtra now if `module` is not installed. Found, not imported: the daemon imports pyfuse3 and
    trio after its socket is served (a restarted snapshotter answers containerd sooner); should the
    import fail then, the CLI reports that ImportError as the same MissingExtra."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(command, module, EXTRA_OF_MODULE[module], f"No module named {module!r}")


def rpull(args) -> int:
    import grpc

    from ..snapshotter import pull
    from ..transfer import registry_reference

    ref = registry_reference(args.ref, "lazybuild rpull")  # docker://, checked before containerd is asked
    try:
        report = pull.rpull(str(ref), args.address, args.namespace, args.snapshotter, platform_of(args), args.insecure,
                            args.name)
    except grpc.RpcError as e:  # a status from containerd, not a bug of ours
        raise RemoteError(f"containerd at {args.address} answered {e.code().name}: {e.details()}",
                          hint="is containerd running, with the snapshotter named by --snapshotter in its config "
                               "(a proxy plugin)?") from None
    text = "\n".join([report["image"]] + [f"  {layer['digest']}: {layer['how']}" for layer in report["layers"]])
    output.emit(args, output.Result(report, text))
    return 0
