"""`lazybuild build`: flags as `docker buildx build` has them; the build, then its export."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from lazybuild.defaults import CACHE_DIR, STATE_DIR
from lazybuild.errors import UsageError
from lazybuild.timings import NoTimings, Timings

from . import output, progress

# The builder and the exporter are imported by run(): every other command (and `--help`) starts without them.


def add_parser(sub) -> None:
    b = sub.add_parser("build", help="build a Dockerfile without a daemon: RUN steps on lazily mounted base images, "
                                     "output as optimized eStargz")
    b.add_argument("context", metavar="CONTEXT")
    b.add_argument("-f", "--file", dest="dockerfile", default="", help="Dockerfile (default CONTEXT/Dockerfile)")
    b.add_argument("-t", "--tag", action="append", default=[], help="name the image (with push=true: where to push)")
    b.add_argument("--target", default="", help="the stage to build (default: the last)")
    b.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    b.add_argument("--platform", default="", help="os/arch (this machine's; no emulation)")
    b.add_argument("--no-cache", action="store_true", help="run every step again")
    b.add_argument("--secret", action="append", default=[], metavar="id=X,src=FILE")
    b.add_argument("-o", "--output", default="", metavar="SPEC",
                   help="type=stargz|oci|tar|local[,compression=gzip|zstd][,dest=PATH][,push=true]")
    b.add_argument("--debug-timings", action="store_true",
                   help="print where the time went (resolve, mount, each step, export, teardown) on stderr")
    b.add_argument("--source-date-epoch", type=int, default=None,
                   help="clamp file times in new layers (default: $SOURCE_DATE_EPOCH)")
    b.add_argument("--insecure", action="store_true", help="skip TLS verification of registries")
    b.add_argument("--state-dir", default=STATE_DIR, help="step cache, cache mounts, profiles (default %(default)s, $LAZYBUILD_STATE)")
    b.add_argument("--cache", default=CACHE_DIR, help="chunk cache of the lazy mounts (default %(default)s, $LAZYBUILD_CACHE)")
    b.add_argument("--metadata-file", default="", help="write the image digest, config and layers as JSON")
    b.add_argument("--optimize", action="store_true",
                   help="run the built image's workload (ENTRYPOINT/CMD, or the command after --) lazily mounted "
                        "and put the files it reads first in each new layer (needs type=stargz,push=true)")
    b.add_argument("--optimize-period", type=float, default=10.0, metavar="S", help="how long the workload runs")
    b.add_argument("--record-base", default="", metavar="FILE",
                   help="append the base image files RUN steps read (NDJSON {path, layer}) to FILE")
    b.add_argument("--profile", choices=("auto", "off", "push"), default="auto",
                   help="build profiles of base images (the files a build reads, prefetched by the next build): "
                        "auto uses one found (state dir, then registry) and saves what was read; push also "
                        "pushes it beside the base image; off neither (default %(default)s)")
    b.set_defaults(workload=[])  # `-- CMD ARGS` after everything else: split off by lazybuild.cli.main
    b.set_defaults(func=run)


def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq and what == "build-arg":
            v = os.environ.get(k, "")
        elif not eq:
            raise UsageError(f"--{what} {item!r}: want KEY=VALUE")
        out[k] = v
    return out


def _secrets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        fields = dict(f.partition("=")[::2] for f in item.split(","))
        sid, src = fields.get("id"), fields.get("src") or fields.get("source")
        if not sid or not src:
            raise UsageError(f"--secret {item!r}: want id=NAME,src=FILE")
        if not os.path.isfile(src):
            raise UsageError(f"--secret {item!r}: {src} is not a file")
        out[sid] = src
    return out


def run(args) -> int:
    from lazybuild.builder.executor import Builder, BuildOptions
    from lazybuild.exporter.assemble import ExportError
    from lazybuild.exporter.daemonless import Optimize, export_build
    from lazybuild.exporter.output import OutputSpec
    from lazybuild.exporter.rootfs import write_rootfs

    log = progress.log  # step lines and what was fetched: lines, JSON events or nothing, as --progress says
    try:
        spec = OutputSpec.parse(args.output) if args.output else None
        if spec and spec.push and not args.tag:
            raise UsageError("--output push=true needs -t REGISTRY/NAME:TAG")
        workload = args.workload
        if workload and not args.optimize:
            raise UsageError(f"unexpected arguments {' '.join(workload)!r} (a workload after -- goes with --optimize)")
        if args.optimize and not (spec and spec.type == "stargz" and spec.push):
            raise UsageError("--optimize needs --output type=stargz,push=true: the pushed image is mounted lazily "
                             "to record what its workload reads")
        opts = BuildOptions(context=args.context, dockerfile=args.dockerfile, target=args.target,
                            build_args=_kv(args.build_arg, "build-arg"), platform=args.platform,
                            no_cache=args.no_cache, secrets=_secrets(args.secret), insecure=args.insecure,
                            state_dir=args.state_dir, chunk_cache=args.cache,
                            record_base=os.path.abspath(args.record_base) if args.record_base else "",
                            profile=args.profile)
    except ExportError as e:  # an --output spec that does not parse: a flag, not a failed export
        raise UsageError(str(e)) from None
    epoch = args.source_date_epoch if args.source_date_epoch is not None else (
        int(os.environ["SOURCE_DATE_EPOCH"]) if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit() else None)
    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: no mount or container is left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    start = time.monotonic()
    timings = Timings() if args.debug_timings else NoTimings()
    builder = Builder(opts, log, timings)
    image = None
    teardown = None
    try:
        try:
            result = builder.run()
        except BaseException:  # what a failed build read is still worth prefetching (and --record-base wants it)
            builder.save_profiles()
            raise
        builder.save_profiles(push=args.profile == "push")  # before any export reads the bases
        log(f"build done in {time.monotonic() - start:.1f} s")
        fetched = result.bytes_fetched()
        for ref, f in fetched.items():
            log(f"  {ref}: {f['fetched'] / 1e6:.1f} MB fetched lazily of {f['size'] / 1e6:.1f} MB")
        if spec is None:
            log("no --output: the result stays in the step cache")
        elif not spec.is_image:
            with timings.phase("export (rootfs)"):
                write_rootfs(builder.view(result.target.layers, "output"), spec.dest, spec.type == "tar", log)
        else:
            # An image is exported from the steps' upper dirs and the base's descriptors, not from the
            # mounts: the lazy mounts are taken down while it is written.
            teardown = threading.Thread(target=_close, args=(builder, timings), name="teardown")
            teardown.start()
            log("exporting layers")
            optimize = Optimize(tuple(workload), args.optimize_period, args.cache) if args.optimize else None
            with timings.phase("export"):
                image = export_build(result, spec, args.tag, insecure=args.insecure, source_date_epoch=epoch,
                                     optimize=optimize, kept_blobs=os.path.join(args.state_dir, "blobs"), log=log)
        metadata = {**_image_metadata(image, args.tag), "bytesFetched": fetched}
        if args.metadata_file:  # for every output, as buildx writes one (an image's keys only with an image)
            tmp = args.metadata_file + ".partial"
            with open(tmp, "w") as f:
                json.dump(metadata, f, indent=1)
            os.replace(tmp, args.metadata_file)
        # The result: the metadata document with --format json; the image digest (none without an image)
        output.emit(args, output.Result(metadata, image.digest if image is not None else "",
                                        primary=image.digest if image is not None else None))
        return 0
    finally:
        if teardown is not None:
            teardown.join()
        else:
            _close(builder, timings)
        if image is not None:
            image.close()
        if args.debug_timings:
            for line in timings.report():
                print(line, file=sys.stderr, flush=True)


def _image_metadata(image, tags: list[str]) -> dict:
    """The keys `docker buildx build --metadata-file` writes for an image (and ours: the config itself, the
    layers); {} without an image (no --output, type=local|tar)."""
    if image is None:
        return {}
    manifest = image.manifest
    out = {**image.summary(), "containerimage.config.digest": manifest.config.digest,
           "containerimage.descriptor": {"mediaType": manifest.media_type, "digest": manifest.digest,
                                         "size": len(manifest.raw)}}
    if tags:
        out["image.name"] = ",".join(tags)
    return out


def _close(builder, timings: Timings) -> None:
    with timings.phase("teardown (unmount)"):
        builder.close()
