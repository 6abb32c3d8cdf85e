#!/usr/bin/env python3
"""The lazybuild BuildKit frontend vs BuildKit's built-in Dockerfile frontend, side by side in one run.

A 200-instruction Dockerfile (ENV, LABEL, ARG, WORKDIR, RUN, COPY; every step cached after a warm-up
build) is built with `DOCKER_BUILDKIT=1 docker build` on a Docker 20.10 daemon of its own (BuildKit v0.8),
once with the built-in frontend and once with `# syntax=<local registry>/lazybuild:bench`, alternating,
`--repeat` times each. Prints the median seconds from build start to result, the ratio ours / built-in
(goal <= 1.5x) and the frontend image's size. A third variant, a Python frontend that only forwards
the build to the built-in one (bench/forward_frontend.py, same image), shows the fixed cost every
`# syntax=` image pays on this daemon: resolving the image, starting its container and interpreter.

With `--upstream-frontend PATH` (a static build of BuildKit's own Go Dockerfile frontend,
`./frontend/dockerfile/cmd/dockerfile-frontend`, made by hand from moby/buildkit; nothing here builds
it) a fourth variant runs: an image made like upstream's (FROM scratch, the binary as ENTRYPOINT, the
same `moby.buildkit.frontend.*` labels) pushed to the same registry and served the same way through
`# syntax=`, the peer a `# syntax=` frontend is measured against; the run prints the ratio ours / upstream
(goal <= 1.0x).

    python3 bench/frontend.py [--repeat 7] [--instructions 200] [--upstream-frontend PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from lazybuild.testing.dockerd import BASE_IMAGE, push_frontend_image, start_with_base
from lazybuild.testing.registry import RegistryProcess

here = os.path.dirname(os.path.abspath(__file__))


def dockerfile(n: int) -> str:
    lines = [f"FROM {BASE_IMAGE}", "ARG GREETING=hello"]
    i = 0
    while len(lines) < n:
        k = i % 6
        if k == 0:
            lines.append(f"ENV VAR_{i}=value-{i}")
        elif k == 1:
            lines.append(f"LABEL org.bench.l{i}=\"${{GREETING}} {i}\"")
        elif k == 2:
            lines.append(f"RUN echo {i} > /step-{i}")
        elif k == 3:
            lines.append(f"COPY file-{i % 10}.txt /copied/{i}.txt")
        elif k == 4:
            lines.append(f"WORKDIR /work/{i}")
        else:
            lines.append(f"ARG A{i}=x{i}")
        i += 1
    return "\n".join(lines) + "\nCMD [\"python3\", \"-c\", \"print(1)\"]\n"


def push_upstream_image(dockerd, binary: str, ref: str, ctx: str) -> str:
    """An image of BuildKit's Go Dockerfile frontend made as upstream's release stage makes it (FROM scratch,
    the static binary as ENTRYPOINT, its labels), pushed to REF and dropped locally so BuildKit pulls it."""
    os.makedirs(ctx)
    shutil.copy(binary, os.path.join(ctx, "dockerfile-frontend"))
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write("FROM scratch\n"
                "LABEL moby.buildkit.frontend.network.none=\"true\"\n"
                "LABEL moby.buildkit.frontend.caps=\"moby.buildkit.frontend.inputs,moby.buildkit.frontend.subrequests,"
                "moby.buildkit.frontend.contexts\"\n"
                "COPY dockerfile-frontend /bin/dockerfile-frontend\n"
                "ENTRYPOINT [\"/bin/dockerfile-frontend\"]\n")
    dockerd.build(ctx, "-t", ref)
    dockerd.docker("push", ref)
    dockerd.docker("rmi", ref)
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--instructions", type=int, default=200)
    ap.add_argument("--upstream-frontend", metavar="PATH",
                    help="a static binary of BuildKit's Go Dockerfile frontend to measure as a fourth variant")
    args = ap.parse_args()
    if args.upstream_frontend and not os.access(args.upstream_frontend, os.X_OK):
        sys.exit(f"--upstream-frontend {args.upstream_frontend}: not an executable file")
    for tool in ("dockerd", "docker-registry", "debootstrap"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (bash scripts/setup.sh)")
    work = tempfile.mkdtemp(prefix="lazybuild-bench-frontend-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    dockerd = start_with_base(os.path.join(work, "dockerd"))
    try:
        ref = push_frontend_image(dockerd, f"{registry.host}/lazybuild:bench")
        ctx = os.path.join(work, "ctx")
        os.makedirs(ctx)
        text = dockerfile(args.instructions)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(text)
        with open(os.path.join(ctx, "Dockerfile.lazybuild"), "w") as f:
            f.write(f"# syntax={ref}\n" + text)
        for i in range(10):
            with open(os.path.join(ctx, f"file-{i}.txt"), "w") as f:
                f.write(f"file {i}\n")
        forward = f"{registry.host}/lazybuild:forward"
        fctx = os.path.join(work, "forward")
        os.makedirs(fctx)
        shutil.copy(os.path.join(here, "forward_frontend.py"), fctx)
        with open(os.path.join(fctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {ref}\nCOPY forward_frontend.py /forward.py\n"
                    "ENTRYPOINT [\"/opt/lazybuild/bin/python3\", \"-I\", \"/forward.py\"]\n")
        dockerd.build(fctx, "-t", forward)
        dockerd.docker("push", forward)
        with open(os.path.join(ctx, "Dockerfile.forward"), "w") as f:
            f.write(f"# syntax={forward}\n" + text)
        variants = {"built-in": os.path.join(ctx, "Dockerfile"), "lazybuild": os.path.join(ctx, "Dockerfile.lazybuild"),
                    "forward": os.path.join(ctx, "Dockerfile.forward")}
        if args.upstream_frontend:
            upstream = push_upstream_image(dockerd, args.upstream_frontend, f"{registry.host}/dockerfile-upstream:bench",
                                           os.path.join(work, "upstream"))
            with open(os.path.join(ctx, "Dockerfile.upstream"), "w") as f:
                f.write(f"# syntax={upstream}\n" + text)
            variants["upstream"] = os.path.join(ctx, "Dockerfile.upstream")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for name, path in variants.items():  # warm-up: the first build runs every step
            dockerd.build(ctx, "-f", path, "-t", f"bench-{name}")
        for _ in range(args.repeat):
            for name, path in variants.items():
                start = time.perf_counter()
                dockerd.build(ctx, "-f", path, "-t", f"bench-{name}")
                times[name].append(time.perf_counter() - start)
        size = int(dockerd.docker("image", "inspect", "--format", "{{.Size}}", ref, check=False).stdout or 0) \
            if dockerd.docker("pull", ref, check=False).returncode == 0 else 0
        base = int(dockerd.docker("image", "inspect", "--format", "{{.Size}}", BASE_IMAGE).stdout)
        b, o = statistics.median(times["built-in"]), statistics.median(times["lazybuild"])

        def paired(other: str) -> str:  # each round ran the variants back to back: steadier on a busy machine
            ratios = [x / y for x, y in zip(times["lazybuild"], times[other])]
            return f"median of the per-round ratios {statistics.median(ratios):.2f}x"
        print(f"{args.instructions}-instruction Dockerfile, all steps cached, median of {args.repeat} "
              f"(Docker 20.10.24, BuildKit v0.8):")
        print(f"  built-in frontend  {b:6.3f} s   runs {', '.join(f'{t:.2f}' for t in times['built-in'])}")
        print(f"  lazybuild frontend {o:6.3f} s   runs {', '.join(f'{t:.2f}' for t in times['lazybuild'])}")
        fw = statistics.median(times["forward"])
        print(f"  forwarding frontend {fw:5.3f} s   runs {', '.join(f'{t:.2f}' for t in times['forward'])}")
        if "upstream" in times:
            u = statistics.median(times["upstream"])
            print(f"  upstream Go frontend {u:5.3f} s   runs {', '.join(f'{t:.2f}' for t in times['upstream'])}")
        print(f"  ratio lazybuild / built-in: {o / b:.2f}x (goal <= 1.5x); {paired('built-in')}")
        if "upstream" in times:
            print(f"  ratio lazybuild / upstream Go frontend: {o / u:.2f}x (goal <= 1.0x); {paired('upstream')}")
        print(f"  fixed cost of a Python # syntax= image (forward - built-in): {fw - b:.3f} s; "
              f"lazybuild's own work (lazybuild - forward): {o - fw:.3f} s")
        print(f"  frontend image: {size / 1e6:.1f} MB ({(size - base) / 1e6:.1f} MB over its base {BASE_IMAGE}, "
              f"{base / 1e6:.1f} MB)")
    finally:
        dockerd.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
