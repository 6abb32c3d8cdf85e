"""`lazybuild build`: flags as `docker buildx build` has them; the build, then its export."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time

from lazybuild.defaults import CACHE_DIR, STATE_DIR
from lazybuild.errors import UsageError
from lazybuild.timings import NoTimings, Timings

from . import output, progress

# Kept here (not imported from the exporter) so that `--help` starts without the exporter.
OUTPUT_HELP = ("PATH (type=local), - (a tar on stdout), type=local|tar,dest=PATH; type=oci|docker[,dest=FILE|-]"
               "[,tar=false][,name=REF] (tarballs; docker without dest: --load); type=image|registry[,name=REF]"
               "[,push=true]; type=stargz[,dest=PATH][,push=true]; compression=gzip|estargz|zstd|zstd:chunked "
               "(layers are always eStargz: gzip/estargz are eStargz-gzip, zstd/zstd:chunked eStargz-zstd)")
NETWORKS = ("default", "host", "none")
MAX_DOCKERFILE = 16 << 20  # as the builder reads a Dockerfile from a context

# The builder and the exporter are imported by run(): every other command (and `--help`) starts without them.


def add_parser(sub) -> None:
    b = sub.add_parser("build", help="build a Dockerfile without a daemon: RUN steps on lazily mounted base images, "
                                     "output as optimized eStargz")
    b.add_argument("context", metavar="CONTEXT",
                   help="a directory, an http(s) URL of a tar archive or a Dockerfile, or a git URL "
                        "(git://..., git@..., https://....git) with #REF:SUBDIR")
    b.add_argument("-f", "--file", dest="dockerfile", default="",
                   help="Dockerfile (default CONTEXT/Dockerfile; - reads it from stdin)")
    b.add_argument("-t", "--tag", action="append", default=[],
                   help="name the image (the names of image outputs without name=; with push=true: where to push)")
    b.add_argument("--target", default="", help="the stage to build (default: the last)")
    b.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    b.add_argument("--platform", default="", help="os/arch (this machine's; no emulation)")
    b.add_argument("--no-cache", action="store_true", help="run every step again")
    b.add_argument("--secret", action="append", default=[], metavar="id=X,src=FILE")
    b.add_argument("--ssh", action="append", default=[], metavar="default|ID[=SOCKET]",
                   help="an SSH agent for RUN --mount=type=ssh (default and an ID alone: $SSH_AUTH_SOCK), relayed "
                        "into the step on a socket of its own")
    b.add_argument("-o", "--output", action="append", default=[], metavar="SPEC", help=OUTPUT_HELP)
    b.add_argument("--push", action="store_true", help="push the image to every -t (--output type=registry)")
    b.add_argument("--load", action="store_true",
                   help="load the image into Docker with `docker load` (--output type=docker); Docker's store drops "
                        "the eStargz annotations")
    b.add_argument("--iidfile", default="", metavar="FILE",
                   help="write the image ID: the config digest, or the manifest digest when the image is pushed")
    b.add_argument("--label", action="append", default=[], metavar="K=V", help="a label in the image config")
    b.add_argument("--pull", action="store_true",
                   help="resolve base images in their registry (lazybuild always does: it keeps no tag cache)")
    b.add_argument("--network", choices=NETWORKS, default="default",
                   help="RUN steps' network: default (the host's, as BuildKit's host-network workers), host, "
                        "none (RUN --network= of a step wins)")
    b.add_argument("--cache-to", action="append", default=[], metavar="SPEC",
                   help="export the build's steps: type=local,dest=DIR (an OCI layout) or type=registry,ref=REF "
                        "(an OCI artifact); inline, gha and s3 are not supported")
    b.add_argument("--cache-from", action="append", default=[], metavar="SPEC",
                   help="import steps before building: type=local,src=DIR or type=registry,ref=REF (or REF)")
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
    from lazybuild.builder import remote_context
    from lazybuild.builder.cache_transfer import CacheSpec
    from lazybuild.builder.executor import BuildOptions
    from lazybuild.builder.ssh_forward import parse_ssh
    from lazybuild.exporter.output import parse_outputs

    log = progress.log  # step lines and what was fetched: lines, JSON events or nothing, as --progress says
    spec = parse_outputs(args.output, args.push, args.load)
    if spec and spec.push and not spec.image_names(args.tag):
        raise UsageError("pushing (--push, push=true, type=registry) needs -t REGISTRY/NAME:TAG or name=")
    if spec and spec.to_stdout and sys.stdout.isatty():  # as buildx: no tar on a terminal
        raise UsageError("-o -/dest=-: refusing to write a tar to a terminal",
                         hint="redirect stdout (> out.tar, | tar t) or give dest=FILE")
    workload = args.workload
    if workload and not args.optimize:
        raise UsageError(f"unexpected arguments {' '.join(workload)!r} (a workload after -- goes with --optimize)")
    if args.optimize and not (spec and spec.type == "stargz" and spec.push):
        raise UsageError("--optimize needs --output type=stargz,push=true: the pushed image is mounted lazily "
                         "to record what its workload reads")
    if args.iidfile and not (spec and spec.is_image):
        raise UsageError("--iidfile needs an image output (type=oci|docker|image|registry|stargz, --push, --load)")
    cache_to = [CacheSpec.parse(c, "to") for c in args.cache_to]
    cache_from = [CacheSpec.parse(c, "from") for c in args.cache_from]
    ssh = parse_ssh(args.ssh)
    labels = _kv(args.label, "label")
    build_args = _kv(args.build_arg, "build-arg")
    secrets = _secrets(args.secret)
    if args.iidfile and os.path.exists(args.iidfile):  # as buildx: no stale ID is left if this build fails
        os.unlink(args.iidfile)
    epoch = args.source_date_epoch if args.source_date_epoch is not None else (
        int(os.environ["SOURCE_DATE_EPOCH"]) if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit() else None)
    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: no mount or container is left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    with tempfile.TemporaryDirectory(prefix="lazybuild-input-") as inputs:
        # a URL or git context is fetched into INPUTS and built as a directory; -f then names a file in it
        context = remote_context.prepare(args.context, inputs, log)
        dockerfile = args.dockerfile
        if dockerfile == "-":
            dockerfile = _stdin_dockerfile(inputs)
        elif dockerfile and context != args.context and not os.path.isabs(dockerfile):
            dockerfile = os.path.join(context, dockerfile)
        opts = BuildOptions(context=context, dockerfile=dockerfile, target=args.target,
                            build_args=build_args, platform=args.platform, no_cache=args.no_cache, secrets=secrets,
                            insecure=args.insecure, state_dir=args.state_dir, chunk_cache=args.cache,
                            record_base=os.path.abspath(args.record_base) if args.record_base else "",
                            profile=args.profile, network="host" if args.network == "default" else args.network,
                            labels=labels, ssh=ssh)
        return _build(args, opts, spec, workload, epoch, log, cache_from, cache_to)


def _build(args, opts, spec, workload, epoch, log, cache_from=(), cache_to=()) -> int:
    from lazybuild.builder.cache_transfer import export_steps, import_steps
    from lazybuild.builder.executor import Builder
    from lazybuild.exporter.daemonless import Optimize, export_build
    from lazybuild.exporter.output import copy_to_stdout
    from lazybuild.exporter.rootfs import write_rootfs

    start = time.monotonic()
    timings = Timings() if args.debug_timings else NoTimings()
    builder = Builder(opts, log, timings)
    image = None
    teardown = None
    try:
        for cache in cache_from:  # before the keys are looked up: an imported step is a cached step
            with timings.phase(f"cache import ({cache})"):
                import_steps(cache, builder.steps_dir, insecure=args.insecure, log=log)
        try:
            result = builder.run()
        except BaseException:  # what a failed build read is still worth prefetching (and --record-base wants it)
            builder.save_profiles()
            raise
        for cache in cache_to:
            with timings.phase(f"cache export ({cache})"):
                export_steps(builder.step_keys, builder.steps_dir, cache, insecure=args.insecure, log=log)
        builder.save_profiles(push=args.profile == "push")  # before any export reads the bases
        log(f"build done in {time.monotonic() - start:.1f} s")
        fetched = result.bytes_fetched()
        for ref, f in fetched.items():
            log(f"  {ref}: {f['fetched'] / 1e6:.1f} MB fetched lazily of {f['size'] / 1e6:.1f} MB")
        if spec is None:
            log("no --output: the result stays in the step cache")
        elif not spec.is_image:
            with timings.phase("export (rootfs)"):
                view = builder.view(result.target.layers, "output")
                if spec.to_stdout:  # complete first, then streamed: a failure sends nothing half-written
                    with tempfile.TemporaryDirectory(prefix="lazybuild-out-") as tmp:
                        write_rootfs(view, os.path.join(tmp, "rootfs.tar"), True, log)
                        copy_to_stdout(os.path.join(tmp, "rootfs.tar"))
                else:
                    write_rootfs(view, spec.dest, spec.type == "tar", log)
        else:
            # An image is exported from the steps' upper dirs and the base's descriptors, not from the
            # mounts: the lazy mounts are taken down while it is written.
            teardown = threading.Thread(target=_close, args=(builder, timings), name="teardown")
            teardown.start()
            log("exporting layers")
            if spec.loads:
                log("--load: Docker's image store keeps the layers but drops the manifest's eStargz annotations; "
                    "push (--push) or write type=oci to keep them")
            elif spec.type == "image" and not spec.push:
                log("type=image without push=true: the image is assembled and not stored anywhere (lazybuild "
                    "has no image store); --push, --load or type=oci keep it")
            optimize = Optimize(tuple(workload), args.optimize_period, args.cache) if args.optimize else None
            with timings.phase("export"):  # named by name= or else every -t (--optimize pushes to the first)
                image = export_build(result, spec, spec.image_names(args.tag), insecure=args.insecure,
                                     source_date_epoch=epoch, optimize=optimize,
                                     kept_blobs=os.path.join(args.state_dir, "blobs"), log=log)
        names = spec.image_names(args.tag) if spec is not None else list(args.tag)
        metadata = {**_image_metadata(image, names), "bytesFetched": fetched}
        if args.metadata_file:  # for every output, as buildx writes one (an image's keys only with an image)
            _write_atomic(args.metadata_file, json.dumps(metadata, indent=1))
        if args.iidfile and image is not None:
            # buildx's image ID: the config digest (what `docker images` shows), the manifest digest once pushed
            _write_atomic(args.iidfile, image.digest if spec.push else image.manifest.config.digest)
        if spec is not None and spec.to_stdout:
            return 0  # stdout holds the output itself
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


def _stdin_dockerfile(directory: str) -> str:
    """`-f -`: the Dockerfile read from stdin into DIRECTORY (outside the context, so no .dockerignore of its own)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("-f -: the Dockerfile is read from stdin, which is a terminal",
                         hint="pipe it in: lazybuild build -f - CONTEXT < Dockerfile")
    data = sys.stdin.buffer.read(MAX_DOCKERFILE + 1)
    if len(data) > MAX_DOCKERFILE:
        raise UsageError(f"-f -: the Dockerfile on stdin is over {MAX_DOCKERFILE >> 20} MiB")
    path = os.path.join(directory, "Dockerfile")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
