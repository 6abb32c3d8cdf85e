#!/usr/bin/env python3
"""Convert the same tar of real files with lazybuild and with the reference (estargz-oracle build) in one run.

Prints throughput of each, their ratio, the compressed-size ratio and peak RSS, for gzip and zstd.
Goals (issue 2): gzip >= 3x the reference's throughput at an output size within 3% of the reference's;
zstd >= 1.5x; a 2 GiB layer in under 200 MiB RSS (`--size 2GiB`).

    python3 bench/convert.py                      # ~350 MB tar made from /usr, both compressions
    python3 bench/convert.py --tar rootfs.tar     # your own tar (e.g. a debootstrap rootfs)
    python3 bench/convert.py --size 2GiB --only ours   # the memory bound on a big layer
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from lazybuild.cli.options import parse_size

WORK = os.environ.get("LAZYBUILD_BENCH_DIR", "/var/tmp/lazybuild-bench")
SOURCES = ["/usr/share", "/usr/bin", "/usr/include", "/usr/lib", "/usr/libexec", "/usr/sbin"]


def make_tar(path: str, size: int) -> str:
    """A tar of real files from /usr, cut at the first entry past `size` bytes of payload."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return path
    print(f"making {path} ({size / 1e6:.0f} MB of files from /usr)...", file=sys.stderr)
    total = 0
    tmp = path + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        for top in SOURCES:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in [""] + sorted(filenames):
                    full = os.path.join(dirpath, name) if name else dirpath
                    try:
                        info = out.gettarinfo(full, arcname=full.lstrip("/"))
                    except OSError:
                        continue
                    if info is None:
                        continue
                    if info.isreg():
                        try:
                            with open(full, "rb") as f:
                                out.addfile(info, f)
                        except OSError:
                            continue
                        total += info.size
                    else:
                        out.addfile(info)
                    if total >= size:
                        break
                if total >= size:
                    break
            if total >= size:
                break
    os.replace(tmp, path)
    return path


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one command."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss * 1024


def measure(cmd: list[str], out: str, repeat: int) -> tuple[float, int, int]:
    runs = [timed(cmd) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs), os.path.getsize(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tar", help="input tar (default: one made from /usr)")
    ap.add_argument("--size", type=parse_size, default=parse_size("350MB"), help="size of the made tar")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the median time is used")
    ap.add_argument("--compression", choices=["gzip", "zstd", "both"], default="both")
    ap.add_argument("--only", choices=["ours", "both"], default="both")
    ap.add_argument("--level", type=int, help="our gzip level (default: ours, 6); the reference always uses its 9")
    args = ap.parse_args()

    os.makedirs(WORK, exist_ok=True)
    src = args.tar or make_tar(os.path.join(WORK, f"usr-{args.size}.tar"), args.size)
    in_size = os.path.getsize(src)
    lazybuild = shutil.which("lazybuild") or sys.exit("lazybuild is not installed (bash scripts/setup.sh)")
    oracle = shutil.which("estargz-oracle")
    if args.only == "both" and not oracle:
        sys.exit("estargz-oracle is not installed (bash scripts/setup.sh builds it)")
    print(f"input: {src}, {in_size / 1e6:.1f} MB, {os.cpu_count()} CPUs")
    print(f"{'':6} {'tool':10} {'seconds':>8} {'MB/s':>8} {'output MB':>10} {'peak RSS MiB':>13}")
    ok = True
    for comp in (["gzip", "zstd"] if args.compression == "both" else [args.compression]):
        ours_out, ref_out = os.path.join(WORK, f"ours.{comp}"), os.path.join(WORK, f"ref.{comp}")
        cmd = [lazybuild, "layer", "convert", src, ours_out] + (["--zstd"] if comp == "zstd" else [])
        if args.level is not None and comp == "gzip":
            cmd += ["--level", str(args.level)]
        ours = measure(cmd, ours_out, args.repeat)
        rows = [("ours", ours)]
        if args.only == "both":
            ref = measure([oracle, "build"] + (["-zstd"] if comp == "zstd" else []) + [src, ref_out], ref_out, args.repeat)
            rows.append(("reference", ref))
        for name, (sec, rss, size) in rows:
            print(f"{comp:6} {name:10} {sec:8.2f} {in_size / sec / 1e6:8.1f} {size / 1e6:10.2f} {rss / 2**20:13.1f}")
        if args.only == "both":
            speed = ref[0] / ours[0]
            size_ratio = ours[2] / ref[2]
            goal = 3.0 if comp == "gzip" else 1.5
            met = speed >= goal and (comp == "zstd" or size_ratio <= 1.03)
            ok &= met
            print(f"{comp:6} ratio: throughput {speed:.2f}x the reference (goal >= {goal}x), "
                  f"output size {size_ratio:.4f} of the reference's -> {'goal met' if met else 'GOAL MISSED'}")
        print(f"{comp:6} ours: peak RSS {ours[1] / 2**20:.0f} MiB for {in_size / 2**30:.2f} GiB "
              f"({'under' if ours[1] < 200 * 2**20 else 'OVER'} 200 MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
