#!/usr/bin/env python3
"""containerd + `lazybuild snapshotter` vs containerd + the reference stargz snapshotter, side by side in
one run of ../shared/tools/stargz-anchor/anchor-bench.sh (its images, registries, slow link and cold
procedure): for each cell (loopback / 20 ms + 200 Mbit link x legacy / eStargz / optimized eStargz x
`python3 -c 'print(1)'` / `gcc hello.c`) every repetition runs the reference and ours back to back
from empty state (daemons restarted, caches dropped), timing `ctr-remote images rpull` + `ctr run`.

    python3 bench/snapshotter.py [--reps 3] [--nets "lo wan"] [--workdir /tmp/anchor] [--prepare-only]

Prints per cell the median total time and registry bytes of each snapshotter and the ratios
(lazybuild / reference; goal: time <= 1.0x, bytes <= the reference's). Legacy gzip images run on
containerd's overlayfs snapshotter (the baseline both lazy snapshotters are measured against).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

from lazybuild.testing.images import CACHE

here = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(here, "..", "..", "shared"))
ANCHOR = os.path.join(SHARED, "tools", "stargz-anchor", "anchor-bench.sh")


def anchor(env: dict, *phases: str) -> None:
    subprocess.run(["bash", ANCHOR, *phases], env=env, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nets", default="lo wan")
    ap.add_argument("--workdir", default="/tmp/anchor")
    ap.add_argument("--prepare-only", action="store_true", help="build tools, images and the slow link; no runs")
    ap.add_argument("--report-only", action="store_true", help="print the table of the last run's results.csv")
    args = ap.parse_args()

    a = args.workdir
    os.makedirs(a, exist_ok=True)
    config = os.path.join(a, "lazybuild-snapshotter.toml")
    with open(config, "w") as f:  # the slow-link registry speaks plain HTTP, as the reference is told too
        f.write('[resolver.host."10.99.1.2:5000"]\n  insecure = true\n')
    env = {**os.environ, "A": a, "BIN": os.path.join(CACHE, "anchor-bin"), "REPS": str(args.reps), "NETS": args.nets,
           "REG_CONFIG": os.path.join(a, "reg-push.yml"), "REG_DATA": os.path.join(a, "regdata"),
           "SNAPSHOTTERS": "stargz lazybuild", "OTHER_NAME": "lazybuild",
           "OTHER_CMD": f"{sys.executable} -I -m lazybuild.cli snapshotter --address {{sock}} --root {{root}} --config {config}"}
    if not args.report_only:
        if not (os.path.exists(os.path.join(a, "manifest-esgz-opt.json")) and
                os.access(os.path.join(env["BIN"], "ctr-remote"), os.X_OK)):
            anchor(env, "deps", "build", "registry", "daemons", "images")
        anchor(env, "registry")
        if "wan" in args.nets.split():
            anchor(env, "wan-up")
        if args.prepare_only:
            return 0
        anchor(env, "bench")
    report(os.path.join(a, "results.csv"))
    return 0


def report(path: str) -> None:
    rows = list(csv.DictReader(open(path)))
    failed = [r for r in rows if r["rc"] != "0"]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["rc"] == "0":
            cells.setdefault((r["net"], r["case"], r["workload"]), {}).setdefault(r["snapshotter"], []).append(r)

    def med(rs, k):
        return statistics.median(int(r[k]) for r in rs)

    print("| link | image | workload | reference: total ms (pull + run) | lazybuild: total ms (pull + run) "
          "| time ratio | reference MB | lazybuild MB | bytes ratio | n |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for (net, case, wl), by in cells.items():
        if case == "legacy":
            rs = by.get("overlayfs", [])
            print(f"| {net} | legacy | {wl} | overlayfs {med(rs, 'total_ms'):.0f} ({med(rs, 'pull_ms'):.0f} + "
                  f"{med(rs, 'run_ms'):.0f}) | - | - | {med(rs, 'reg_bytes') / 1e6:.1f} | - | - | {len(rs)} |")
            continue
        ref, ours = by.get("stargz", []), by.get("lazybuild", [])
        if not ref or not ours:
            print(f"| {net} | {case} | {wl} | {len(ref)} ok | {len(ours)} ok | - | - | - | - | - |")
            ok = False
            continue
        t = med(ours, "total_ms") / med(ref, "total_ms")
        b = med(ours, "reg_bytes") / med(ref, "reg_bytes")
        ok &= t <= 1.0 and b <= 1.0
        print(f"| {net} | {case} | {wl} | {med(ref, 'total_ms'):.0f} ({med(ref, 'pull_ms'):.0f} + {med(ref, 'run_ms'):.0f}) "
              f"| {med(ours, 'total_ms'):.0f} ({med(ours, 'pull_ms'):.0f} + {med(ours, 'run_ms'):.0f}) | {t:.2f}x "
              f"| {med(ref, 'reg_bytes') / 1e6:.1f} | {med(ours, 'reg_bytes') / 1e6:.1f} | {b:.2f}x | {min(len(ref), len(ours))} |")
    print(f"\nfailed runs: {len(failed)}" + "".join(f"\n  {r['net']} {r['case']} {r['snapshotter']} {r['workload']} rep {r['rep']}"
                                              for r in failed))
    print("goal (time <= 1.0x and bytes <= 1.0x in every lazy cell):", "MET" if ok and not failed else "NOT MET")


if __name__ == "__main__":
    sys.exit(main())
