"""`lazybuild build`: flags as `docker buildx build` has them; the build, then its export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

from lazybuild.exporter import image as export
from lazybuild.exporter.optimize import record_workload

from lazybuild.builder.executor import STATE_DIR, BuildError, Builder, BuildOptions


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
    b.add_argument("--progress", choices=("auto", "plain", "quiet"), default="auto")
    b.add_argument("--source-date-epoch", type=int, default=None,
                   help="clamp file times in new layers (default: $SOURCE_DATE_EPOCH)")
    b.add_argument("--insecure", action="store_true", help="skip TLS verification of registries")
    b.add_argument("--state-dir", default=STATE_DIR, help="step cache and cache mounts (default %(default)s)")
    b.add_argument("--cache", default="/var/cache/lazybuild", help="chunk cache of the lazy mounts")
    b.add_argument("--metadata-file", default="", help="write the image digest, config and layers as JSON")
    b.add_argument("--optimize", action="store_true",
                   help="run the built image's workload (ENTRYPOINT/CMD, or the command after --) lazily mounted "
                        "and put the files it reads first in each new layer (needs type=stargz,push=true)")
    b.add_argument("--optimize-period", type=float, default=10.0, metavar="S", help="how long the workload runs")
    b.add_argument("--record-base", default="", metavar="FILE",
                   help="append the base image files RUN steps read (NDJSON {path, layer}) to FILE")
    b.set_defaults(workload=[])  # `-- CMD ARGS` after everything else: split off by lazybuild.cli.main
    b.set_defaults(func=run)


def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq and what == "build-arg":
            v = os.environ.get(k, "")
        elif not eq:
            raise BuildError(f"--{what} {item!r}: want KEY=VALUE")
        out[k] = v
    return out


def _secrets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        fields = dict(f.partition("=")[::2] for f in item.split(","))
        sid, src = fields.get("id"), fields.get("src") or fields.get("source")
        if not sid or not src:
            raise BuildError(f"--secret {item!r}: want id=NAME,src=FILE")
        if not os.path.isfile(src):
            raise BuildError(f"--secret {item!r}: {src} is not a file")
        out[sid] = src
    return out


def run(args) -> int:
    quiet = args.progress == "quiet"
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        spec = export.OutputSpec.parse(args.output) if args.output else None
        if spec and spec.push and not args.tag:
            raise BuildError("--output push=true needs -t REGISTRY/NAME:TAG")
        workload = args.workload
        if workload and not args.optimize:
            raise BuildError(f"unexpected arguments {' '.join(workload)!r} (a workload after -- goes with --optimize)")
        if args.optimize and not (spec and spec.type == "stargz" and spec.push):
            raise BuildError("--optimize needs --output type=stargz,push=true: the pushed image is mounted lazily "
                             "to record what its workload reads")
        opts = BuildOptions(context=args.context, dockerfile=args.dockerfile, target=args.target,
                            build_args=_kv(args.build_arg, "build-arg"), platform=args.platform,
                            no_cache=args.no_cache, secrets=_secrets(args.secret), insecure=args.insecure,
                            state_dir=args.state_dir, chunk_cache=args.cache,
                            record_base=os.path.abspath(args.record_base) if args.record_base else "")
    except (BuildError, export.ExportError) as e:
        print(f"lazybuild: error: {e}", file=sys.stderr)
        return 1
    epoch = args.source_date_epoch if args.source_date_epoch is not None else (
        int(os.environ["SOURCE_DATE_EPOCH"]) if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit() else None)
    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: no mount or container is left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    start = time.monotonic()
    builder = Builder(opts, log)
    image = None
    try:
        result = builder.run()
        log(f"build done in {time.monotonic() - start:.1f} s")
        fetched = result.bytes_fetched()
        for ref, f in fetched.items():
            log(f"  {ref}: {f['fetched'] / 1e6:.1f} MB fetched lazily of {f['size'] / 1e6:.1f} MB")
        if spec is None:
            log("no --output: the result stays in the step cache")
        elif spec.type in ("tar", "local"):
            export.write_rootfs(builder, result, spec.dest, spec.type == "tar", log)
        else:
            log("exporting layers")
            image = export.build_image(result, spec.compression, source_date_epoch=epoch, log=log)
            if spec.type == "oci":
                export.write_layout(image, spec.dest, (args.tag[0].rsplit(":", 1)[-1] if args.tag else "latest"),
                                    as_tar=spec.dest.endswith(".tar") or spec.extra.get("tar") == "true", log=log)
            if spec.type == "stargz" and spec.dest:
                export.write_layout(image, spec.dest, "latest", as_tar=spec.dest.endswith(".tar"), log=log)
            if spec.push and args.optimize:
                export.push(image, args.tag[:1], insecure=args.insecure, log=log)
                reads = record_workload(args.tag[0], json.loads(image.config), workload, args.optimize_period,
                                        insecure=args.insecure, chunk_cache=args.cache, log=log)
                prioritized = {i: paths for i, paths in reads.items()
                               if i < len(result.target.layers) and result.target.layers[i].image is None}
                for i, paths in sorted(reads.items()):
                    kind = "new, reordered" if i in prioritized else "base, kept"
                    log(f"optimize: layer {i} ({kind}): {len(paths)} files read by the workload")
                shutil.rmtree(image.workdir, ignore_errors=True)
                image = export.build_image(result, spec.compression, prioritized=prioritized, source_date_epoch=epoch,
                                           log=log)
            if spec.push:
                export.push(image, args.tag, insecure=args.insecure, log=log)
        if args.metadata_file and image is not None:
            tmp = args.metadata_file + ".partial"
            with open(tmp, "w") as f:
                json.dump({**export.summary(image), "bytesFetched": fetched}, f, indent=1)
            os.replace(tmp, args.metadata_file)
        if image is not None:
            print(image.digest)
        return 0
    except (BuildError, export.ExportError) as e:
        print(f"lazybuild: error: {e}", file=sys.stderr)
        return 1
    finally:
        builder.close()
        if image is not None:
            shutil.rmtree(image.workdir, ignore_errors=True)
