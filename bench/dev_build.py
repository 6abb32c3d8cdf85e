#!/usr/bin/env python3
"""The dev-image build (examples/dev-image: WORKDIR /src, COPY src/ ., RUN make in a ~400 MB Debian
toolchain image, then the static binary alone in a scratch image), side by side in one run:

- `lazybuild build --output type=oci,dest=DIR`: the toolchain (eStargz in the registry) is mounted lazily;
  only what the compile reads is fetched;
- the reference, the engine BuildKit's stargz mode runs on: containerd 1.6 + the stargz snapshotter
  (../shared/tools/stargz-anchor/anchor-bench.sh builds and starts both; bench/stargz_reference.py):
  `ctr-remote images rpull --snapshotter stargz` of the toolchain, then `ctr run --snapshotter stargz`
  of `make` in /src with the context's src/ bind-mounted there (the same RUN on the same toolchain);
- `DOCKER_BUILDKIT=1 docker build` on Docker 20.10 (BuildKit v0.8), which pulls the toolchain whole
  (cold only, on the plain eStargz toolchain; --no-docker leaves it out).

Each repetition runs, for each builder in turn (lazybuild and the reference alternate going first):
- cold: lazybuild with a fresh state dir and chunk cache; the reference's daemons restarted on wiped
  state (anchor-bench.sh's `daemons` phase); docker's image and build cache removed; then for all
  three the page cache dropped and the toolchain's blobs re-read into it (a warm registry server, as
  anchor-bench.sh does). Timed: the whole `lazybuild build`, rpull + `ctr run`, the whole `docker build`;
- warm, nothing changed: `lazybuild build` again on the same state dir and cache, against the same
  `ctr run` again with the snapshotter's state warm (image pulled, chunks cached);
- warm, one file changed: src/app.c edited in the run's copy of the context, then the same again.
The reference writes /out to a fresh host directory each run, so each of its runs compiles (it has no
step cache; BuildKit's would make its no-change rerun a cache hit).

Toolchains: as converted (eStargz) and re-optimized for builds (the files one build's RUN steps read,
recorded with --record-base, put first behind the prefetch landmark). A third lazybuild row, cold only:
the plain eStargz toolchain with the build profile that recording build saved, pushed beside the toolchain
(`lazybuild profile push`), found by a build on an empty state dir and cache in the registry and
prefetched before `make` starts (compared with the reference's cold run on the plain toolchain). Links: loopback, and an emulated
slow link (router namespace, 20 ms each way by nfqdelay, 200 Mbit/s by tbf, as anchor-bench.sh does;
every builder reaches it through one loopback forwarder). Bytes are the toolchain repository's bytes in
the registry's access log (manifests, config, blobs). Prints, per link and toolchain, the median wall
time and bytes of each builder and the ratios lazybuild / reference (goal: time <= 1.0x with bytes
<= the reference's; stretch: <= 0.8x) and the load average the runs saw; progress on stderr.

    python3 bench/dev_build.py [--repeat N] [--no-wan] [--only lo|wan] [--no-docker]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from lazy_pull import Wan, drop_caches  # bench/ is on sys.path: python puts the script's folder there
from stargz_reference import StargzReference

from lazybuild.testing.dockerd import Dockerd
from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from lazybuild.testing.registry import RegistryProcess

here = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(here, "..", "examples", "dev-image")
PACKAGES = ("python3", "gcc", "libc6-dev", "make")
# The interpreter running this bench, not the `lazybuild` on PATH: a version manager's shim there (pyenv's is
# a bash script that execs `pyenv exec`) costs 0.2-0.4 s per call that is not lazybuild's. -P: the current
# directory stays off sys.path, so a source tree it may be in cannot shadow the lazybuild being measured.
LAZYBUILD = [sys.executable, "-P", "-m", "lazybuild.cli"]
PATHS = ("cold", "warm, nothing changed", "warm, 1 file changed")


LOADS: list[float] = []  # the 1-minute load average after each timed run: other work on the machine skews times


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB" if n else "0 B"


def note_load() -> str:
    LOADS.append(os.getloadavg()[0])
    return f"load {LOADS[-1]:.1f}"


class Forwarder:
    """127.0.0.1:PORT -> the slow-link registry. Docker 20.10's BuildKit speaks plain HTTP only to
    loopback registries, so both builders reach the namespace registry through this, over the same link."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


class AccessLog:
    """Bytes the registry sent for the toolchain repository, from its access log (combined format)."""

    LINE = re.compile(rb'"(?:GET|HEAD) /v2/toolchain/\S* HTTP/[0-9.]+" \d{3} (\d+)')

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = os.path.getsize(self.path)

    def since_mark(self) -> tuple[int, int]:
        """(bytes, requests) since mark()."""
        time.sleep(0.3)  # a request's line is written when its handler returns
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            sizes = [int(m.group(1)) for m in self.LINE.finditer(f.read())]
        return sum(sizes), len(sizes)


class Toolchain:
    """The toolchain images in the registry's storage: re-read into the page cache before a cold run."""

    def __init__(self, storage: str, registry_host: str):
        self.storage = storage
        self.blobs: dict[str, list[str]] = {}
        self.registry_host = registry_host

    def add(self, tag: str) -> int:
        info = json.loads(subprocess.run([*LAZYBUILD, "inspect", "--format", "json", f"{self.registry_host}/toolchain:{tag}"], check=True,
                                         capture_output=True, text=True).stdout)
        m = info["manifest"]
        self.blobs[tag] = [d["digest"] for d in [m["config"], *m["layers"]]]
        return sum(layer["size"] for layer in m["layers"])

    def cold(self, tag: str) -> None:
        drop_caches()
        for digest in self.blobs[tag]:
            h = digest.split(":")[1]
            with open(os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256", h[:2], h, "data"), "rb") as f:
                while f.read(1 << 20):
                    pass


def context_copy(work: str) -> str:
    d = tempfile.mkdtemp(dir=work)
    shutil.copytree(EXAMPLE, os.path.join(d, "ctx"))
    return os.path.join(d, "ctx")


def edit_source(ctx: str) -> None:
    with open(os.path.join(ctx, "src", "app.c"), "a") as f:
        f.write(f"/* bench edit {time.time_ns()} */\n")


def lazy_build(toolchain: str, ctx: str, run: str, record: str = "", profile: str = "off") -> float:
    """One `lazybuild build` with run's state dir and chunk cache, to a fresh OCI layout directory. Build
    profiles are off but where a row is about them (PROFILE auto): the toolchain's is in the registry."""
    out = tempfile.mkdtemp(dir=run)
    cmd = [*LAZYBUILD, "build", ctx, "--build-arg", f"TOOLCHAIN={toolchain}", "--output", f"type=oci,dest={out}/layout",
           "--state-dir", f"{run}/state", "--cache", f"{run}/cache", "--progress", "quiet", "--profile", profile]
    start = time.perf_counter()
    subprocess.run(cmd + (["--record-base", record] if record else []), check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if not os.path.exists(os.path.join(out, "layout", "index.json")):
        raise SystemExit(f"lazybuild build wrote no OCI layout at {out}/layout")
    shutil.rmtree(out)
    return elapsed


def reference_build(ref: StargzReference, toolchain: str, ctx: str, run: str, pull: bool) -> float:
    out = tempfile.mkdtemp(dir=run)
    elapsed = ref.run(toolchain, os.path.join(ctx, "src"), "/src", ["make"], out, pull)
    if not os.path.exists(os.path.join(out, "app")):
        raise SystemExit(f"the reference's make wrote no /out/app ({out})")
    shutil.rmtree(out)
    return elapsed


def docker_build(dockerd: Dockerd, toolchain: str) -> float:
    start = time.perf_counter()
    dockerd.build(EXAMPLE, "--build-arg", f"TOOLCHAIN={toolchain}", "-t", "dev-image-bench")
    return time.perf_counter() - start


def docker_forget(dockerd: Dockerd, toolchain: str) -> None:
    dockerd.docker("rmi", "-f", toolchain, "dev-image-bench", check=False)
    dockerd.docker("builder", "prune", "-af", check=False)


def series(name: str, cold, warm, edit, log: AccessLog, results: dict, label: str) -> None:
    """cold, rerun, edit + rerun: each timed with its registry bytes, into results[(builder, path)]."""
    for path, step in zip(PATHS, (cold, warm, lambda: (edit(), warm())[1])):
        log.mark()
        sec = step()
        fetched, requests = log.since_mark()
        results.setdefault((name, path), []).append((sec, fetched))
        progress(f"{label} {name:9} {path:22} {sec:6.2f} s {size(fetched):>8} {requests:4} requests  {note_load()}")


def lazy_series(toolchains: Toolchain, variant: str, toolchain: str, work: str, log: AccessLog, cell: dict,
                label: str) -> None:
    run, ctx = tempfile.mkdtemp(dir=work), context_copy(work)
    series("lazybuild", lambda: (toolchains.cold(variant), lazy_build(toolchain, ctx, run))[1],
           lambda: lazy_build(toolchain, ctx, run), lambda: edit_source(ctx), log, cell, label)
    shutil.rmtree(run)


def lazy_profile_cold(toolchains: Toolchain, toolchain: str, work: str, log: AccessLog, cell: dict,
                      label: str) -> None:
    """A cold `lazybuild build` of the plain toolchain on an empty state dir and cache: it finds the build
    profile pushed beside the toolchain (referrers API, then its tag) and prefetches what `make` reads."""
    run, ctx = tempfile.mkdtemp(dir=work), context_copy(work)
    toolchains.cold("esgz")
    log.mark()
    sec = lazy_build(toolchain, ctx, run, profile="auto")
    fetched, requests = log.since_mark()
    cell.setdefault(("lazybuild+profile", "cold"), []).append((sec, fetched))
    progress(f"{label} lazybuild with profile  cold {sec:6.2f} s {size(fetched):>8} {requests:4} requests  {note_load()}")
    shutil.rmtree(run)


def reference_series(ref: StargzReference, toolchains: Toolchain, variant: str, toolchain: str, work: str,
                     log: AccessLog, cell: dict, label: str) -> None:
    run, ctx = tempfile.mkdtemp(dir=work), context_copy(work)

    def cold():
        ref.restart_empty()
        toolchains.cold(variant)
        return reference_build(ref, toolchain, ctx, run, pull=True)

    try:
        series("reference", cold, lambda: reference_build(ref, toolchain, ctx, run, pull=False),
               lambda: edit_source(ctx), log, cell, label)
    finally:
        ref.close()  # its background fetch must not run into the next builder's time and bytes
    shutil.rmtree(run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-wan", action="store_true", help="loopback only (same as --only lo)")
    ap.add_argument("--only", choices=("lo", "wan"), help="one link")
    ap.add_argument("--no-docker", action="store_true", help="leave out the full-pull docker build")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, runc, containerd, network namespaces)")
    nets = [args.only] if args.only else ["lo"] if args.no_wan else ["lo", "wan"]
    work = tempfile.mkdtemp(prefix="lazybuild-bench-dev-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    dockerd = wan = forwarder = ref = None
    try:
        progress("toolchain: debootstrap rootfs, push, convert")
        rootfs = debootstrap_rootfs(PACKAGES)
        archive = docker_archive([rootfs], os.path.join(work, "toolchain.tar"), cmd=["/bin/bash"])
        subprocess.run([*LAZYBUILD, "push", f"docker-archive:{archive}", f"{registry.host}/toolchain:plain"],
                       check=True, capture_output=True)
        subprocess.run([*LAZYBUILD, "convert", f"{registry.host}/toolchain:plain", f"{registry.host}/toolchain:esgz"],
                       check=True, capture_output=True)
        os.unlink(archive)
        storage = os.path.join(work, "registry", "data")
        toolchains = Toolchain(storage, registry.host)
        image_bytes = toolchains.add("esgz")
        # The toolchain optimized for builds: what one build's RUN steps read goes first, behind the
        # prefetch landmark (lazybuild build --record-base, then lazybuild convert --prioritized-files).
        record = os.path.join(work, "base-reads.ndjson")
        rec_run = tempfile.mkdtemp(dir=work)
        lazy_build(f"{registry.host}/toolchain:esgz", context_copy(work), rec_run, record, profile="auto")
        # The same build's profile (the files it read from the plain toolchain), pushed beside it: a cold
        # build on any machine finds it in the registry and prefetches those files before `make` starts.
        subprocess.run([*LAZYBUILD, "profile", "push", f"{registry.host}/toolchain:esgz", "--state-dir",
                        f"{rec_run}/state"], check=True, capture_output=True)
        shutil.rmtree(rec_run)
        subprocess.run([*LAZYBUILD, "convert", f"{registry.host}/toolchain:plain", f"{registry.host}/toolchain:opt",
                        "--prioritized-files", record], check=True, capture_output=True)
        toolchains.add("opt")
        links = []
        if "lo" in nets:
            links.append(("loopback", registry.host, AccessLog(registry.log.name)))
        if "wan" in nets:
            progress("slow link: namespaces, nfqdelay, tbf")
            # own namespace names and subnet: anchor-bench.sh's link (10.99, anc-*) may be up for another bench
            wan_log = os.path.join(work, "registry-wan.log")
            wan = Wan(storage, work, name="lzbd", net="10.98", access_log=wan_log)
            host, port = wan.host.split(":")
            # Docker 20.10's BuildKit speaks plain HTTP only to loopback registries (and the stargz
            # snapshotter does so by default): every builder goes through this forwarder, over the same link
            forwarder = Forwarder((host, int(port)))
            links.append(("20 ms + 200 Mbit", forwarder.host, AccessLog(wan_log)))
        progress("reference: containerd + stargz snapshotter (anchor-bench.sh)")
        ref = StargzReference(os.path.join(work, "anchor"))
        if not args.no_docker:
            dockerd = Dockerd(os.path.join(work, "dockerd"))
        results: dict[tuple, dict] = {}
        for link, host, log in links:
            for rep in range(1, args.repeat + 1):
                for variant in ("esgz", "opt"):
                    cell = results.setdefault((link, variant), {})
                    label = f"{link} {variant} {rep}/{args.repeat}"
                    toolchain = f"{host}/toolchain:{variant}"
                    builders = [lambda: lazy_series(toolchains, variant, toolchain, work, log, cell, label),
                                lambda: reference_series(ref, toolchains, variant, toolchain, work, log, cell, label)]
                    for builder in builders if rep % 2 else builders[::-1]:  # neither always runs first
                        builder()
                    if variant == "esgz":
                        lazy_profile_cold(toolchains, toolchain, work, log, cell, label)
                if dockerd:
                    docker_forget(dockerd, f"{host}/toolchain:esgz")
                    toolchains.cold("esgz")
                    log.mark()
                    sec = docker_build(dockerd, f"{host}/toolchain:esgz")
                    fetched, requests = log.since_mark()
                    results[(link, "esgz")].setdefault(("docker", "cold"), []).append((sec, fetched))
                    progress(f"{link} esgz {rep}/{args.repeat} docker    cold {sec:6.2f} s {size(fetched):>8} "
                             f"{requests:4} requests  {note_load()}")
        report(results, args.repeat, image_bytes, bool(dockerd))
    finally:
        if ref:
            ref.close()
        if dockerd:
            dockerd.stop()
        if forwarder:
            forwarder.close()
        if wan:
            wan.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict, repeat: int, image_bytes: int, docker: bool) -> None:
    def med(runs):
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    def ratio(a, b):
        return f"{a / b:.2f}x" if b else ("1.00x (none)" if a == b else "more (reference: none)")

    print(f"dev-image build, median of {repeat}; toolchain {image_bytes / 1e6:.1f} MB compressed; "
          "bytes: the toolchain's, from the registry's access log; "
          f"1-min load average over the runs {min(LOADS):.1f}-{max(LOADS):.1f} on {os.cpu_count()} CPUs")
    print("| link | toolchain | build | lazybuild build | reference: containerd + stargz | time lazybuild/ref "
          "| bytes lazybuild/ref |" + (" docker build (whole pull) |" if docker else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if docker else ""))
    verdicts = []
    for (link, variant), cell in results.items():
        for path in PATHS:
            (lt, lb), (rt, rb) = med(cell[("lazybuild", path)]), med(cell[("reference", path)])
            row = (f"| {link} | {'eStargz' if variant == 'esgz' else 'eStargz, build-optimized'} | {path} "
                   f"| {lt:.2f} s, {size(lb)} | {rt:.2f} s, {size(rb)} | {lt / rt:.2f}x | {ratio(lb, rb)} |")
            if docker:
                d = results[(link, "esgz")].get(("docker", path))
                row += f" {med(d)[0]:.2f} s, {size(med(d)[1])} |" if d else " - |"
            print(row)
            verdicts.append((lt / rt <= 1.0 and lb <= rb, lt / rt <= 0.8 and lb <= rb))
        if ("lazybuild+profile", "cold") in cell:  # the plain toolchain again, with its profile from the registry
            (lt, lb), (rt, rb) = med(cell[("lazybuild+profile", "cold")]), med(cell[("reference", "cold")])
            print(f"| {link} | eStargz + build profile from the registry | cold | {lt:.2f} s, {size(lb)} "
                  f"| {rt:.2f} s, {size(rb)} | {lt / rt:.2f}x | {ratio(lb, rb)} |" + (" - |" if docker else ""))
            verdicts.append((lt / rt <= 1.0 and lb <= rb, lt / rt <= 0.8 and lb <= rb))
    print(f"goal (time <= 1.0x with bytes <= the reference's): {sum(v[0] for v in verdicts)} of {len(verdicts)} rows; "
          f"stretch (<= 0.8x, same bytes condition): {sum(v[1] for v in verdicts)} of {len(verdicts)}")
    print("runs:")
    for (link, variant), cell in results.items():
        for (name, path), runs in cell.items():
            print(f"  {link} {variant} {name} {path}: " + ", ".join(f"{t:.2f} s {size(b)}" for t, b in runs))


if __name__ == "__main__":
    sys.exit(main())
