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

    python3 bench/snapshotter.py --concurrency N [--reps 3] [--case esgz]

runs the snapshotters under concurrency instead, on the loopback registry: each round starts from empty
state (daemons restarted, page cache dropped) and N clients at once each `ctr-remote images rpull` the
same python image and `ctr run` its own container (`python3 -c 'print(1)'`). Per snapshotter it prints
the round time (until the last container has printed), the peak RSS of the snapshotter (its VmHWM and
the polled RSS of it and its children, whichever is larger), and the restart-to-accept time: with N more
containers starting, the snapshotter is killed (-9) and started again on the same root, timed until its
socket answers a gRPC Stat. Medians of the reps, both snapshotters alternating in each rep, and the
ratios ours / reference (goals: round time <= 1.0x, peak RSS <= 1.2x, restart-to-accept <= 1 s).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

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
    ap.add_argument("--concurrency", type=int, metavar="N", help="N concurrent starts per round (see above)")
    ap.add_argument("--case", default="esgz", choices=["esgz", "esgz-opt"], help="the image of --concurrency")
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
        if args.concurrency:
            return concurrency(env, args.concurrency, args.reps, args.case)
        if "wan" in args.nets.split():
            anchor(env, "wan-up")
        if args.prepare_only:
            return 0
        anchor(env, "bench")
    report(os.path.join(a, "results.csv"))
    return 0


# --- --concurrency ---------------------------------------------------------------------------------------

REG_LO = "127.0.0.1:5001"  # anchor-bench.sh's loopback registry
SNAPSHOTTERS = {"stargz": "stargz", "lazybuild": "other"}  # our name -> anchor-bench.sh's name (pid, socket, log)


def daemon_cmd(env: dict, sn: str) -> list[str]:
    a = env["A"]
    if sn == "stargz":
        return [os.path.join(env["BIN"], "stargz-snapshotter"), "-address", f"{a}/stargz/stargz.sock",
                "-root", f"{a}/stargz/root", "-config", f"{a}/stargz/config.toml"]
    return shlex.split(env["OTHER_CMD"].replace("{sock}", f"{a}/other/other.sock").replace("{root}", f"{a}/other/root"))


def sock_of(env: dict, sn: str) -> str:
    return f"{env['A']}/stargz/stargz.sock" if sn == "stargz" else f"{env['A']}/other/other.sock"


def pid_of(env: dict, sn: str) -> int:
    with open(os.path.join(env["A"], "pids", SNAPSHOTTERS[sn] + ".pid")) as f:
        return int(f.read())


def tree_rss_kib(pid: int) -> int:
    """RSS of `pid` and its descendants, in KiB (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        total += status_kib(p, "VmRSS")
    return total


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssPoller:
    """The largest RSS of a process tree, polled every 20 ms while it runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, tree_rss_kib(self.pid))

    def stop(self) -> int:
        """Peak RSS in KiB: the polled peak or the main process's high-water mark, whichever is larger."""
        hwm = status_kib(self.pid, "VmHWM")
        self.done.set()
        self.thread.join()
        return max(self.peak, hwm)


def cold(env: dict, case: str) -> None:
    """anchor-bench.sh's cold start: both daemons and containerd anew on empty state, page cache dropped,
    the image's blobs read back into it (a warm registry)."""
    anchor(env, "daemons")
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    import json
    with open(os.path.join(env["A"], f"manifest-{case}.json")) as f:
        m = json.load(f)
    for d in [m["config"]["digest"]] + [layer["digest"] for layer in m["layers"]]:
        h = d.split(":")[1]
        with open(os.path.join(env["REG_DATA"], "docker/registry/v2/blobs/sha256", h[:2], h, "data"), "rb") as f:
            while f.read(1 << 20):
                pass


def ctr(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    sock = os.path.join(env["A"], "containerd", "containerd.sock")
    return subprocess.run(["ctr", "-a", sock, *args], capture_output=True, text=True, timeout=timeout)


def start(env: dict, sn: str, ref: str, name: str, pull: bool) -> tuple[bool, str, float]:
    """One client: rpull (as anchor-bench.sh does) then run a container; (ok, what failed, seconds the
    rpull took)."""
    sock = os.path.join(env["A"], "containerd", "containerd.sock")
    t0 = time.monotonic()
    try:
        if pull:
            r = subprocess.run([os.path.join(env["BIN"], "ctr-remote"), "-a", sock, "images", "rpull", "--snapshotter", sn,
                                "--plain-http", ref], capture_output=True, text=True, timeout=180)
            if r.returncode != 0:
                return False, "rpull: " + r.stderr.strip()[-300:], 0.0
        pulled = time.monotonic() - t0
        r = ctr(env, "run", "--rm", "--net-host", "--snapshotter", sn, ref, name, "python3", "-c", "print(1)")
    except subprocess.TimeoutExpired as e:
        return False, f"timed out: {e.cmd}", 0.0
    if r.returncode != 0 or r.stdout.strip() != "1":
        return False, f"run {name}: rc {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}", pulled
    return True, "", pulled


def clients(env: dict, sn: str, ref: str, names: list[str], pull: bool) -> list[threading.Thread]:
    results: list[tuple[bool, str, float]] = []
    threads = [threading.Thread(target=lambda n=n: results.append(start(env, sn, ref, n, pull))) for n in names]
    for t in threads:
        t.start()
    threads.append(results)  # type: ignore[arg-type]  # read by the caller after joining
    return threads


def join(threads: list) -> list[tuple[bool, str, float]]:
    *ts, results = threads
    for t in ts:
        t.join()
    return results


def answers(sock: str) -> bool:
    """Whether a gRPC Stat on `sock` gets an answer (any status but "cannot connect")."""
    import grpc

    from lazybuild.snapshotter.proto import snapshots_pb2, snapshots_pb2_grpc

    if not os.path.exists(sock):
        return False
    with grpc.insecure_channel("unix://" + sock) as ch:
        try:
            snapshots_pb2_grpc.SnapshotsStub(ch).Stat(snapshots_pb2.StatSnapshotRequest(key="bench-probe"), timeout=1)
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return True


def restart_under_load(env: dict, sn: str, ref: str, n: int, rep: int) -> tuple[float, int]:
    """Start n more containers, kill -9 the snapshotter 0.5 s in and start it again on the same root, as a
    supervisor would (again 0.1 s after each exit: the reference refuses to start while the containers
    of its killed run still hold its mounts). Returns (seconds from the first start until its socket
    answers, starts it took)."""
    load = clients(env, sn, ref, [f"load-{sn}-{rep}-{i}" for i in range(n)], pull=False)
    time.sleep(0.5)
    os.kill(pid_of(env, sn), 9)
    log = open(os.path.join(env["A"], "logs", SNAPSHOTTERS[sn] + ".log"), "a")
    started, starts, proc = time.monotonic(), 0, None
    while True:
        if proc is None or proc.poll() is not None:
            if proc is not None:
                time.sleep(0.1)
            proc = subprocess.Popen(daemon_cmd(env, sn), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            starts += 1
            with open(os.path.join(env["A"], "pids", SNAPSHOTTERS[sn] + ".pid"), "w") as f:
                f.write(str(proc.pid))  # anchor-bench.sh's daemons_down stops it
        if answers(sock_of(env, sn)):
            break
        if time.monotonic() - started > 120:
            raise SystemExit(f"{sn} did not answer within 120 s of its restart ({starts} starts); see its log")
        time.sleep(0.01)
    took = time.monotonic() - started
    join(load)  # they may fail: their snapshotter died under them
    for line in ctr(env, "tasks", "ls", "-q").stdout.split():  # what a failed `ctr run --rm` left
        ctr(env, "tasks", "kill", "-s", "KILL", line)
        ctr(env, "tasks", "rm", "-f", line)
    for line in ctr(env, "containers", "ls", "-q").stdout.split():
        ctr(env, "containers", "rm", line)
    return took, starts


def concurrency(env: dict, n: int, reps: int, case: str) -> int:
    ref = f"{REG_LO}/anchor/dev:{case}"
    got: dict[str, dict[str, list[float]]] = {sn: {"round": [], "runs": [], "rss": [], "accept": []} for sn in SNAPSHOTTERS}
    failures = []
    for rep in range(reps):
        for sn in list(SNAPSHOTTERS)[::1 if rep % 2 == 0 else -1]:  # each goes first in every other rep
            cold(env, case)
            rss = RssPoller(pid_of(env, sn))
            t0 = time.monotonic()
            results = join(clients(env, sn, ref, [f"c-{sn}-{rep}-{i}" for i in range(n)], pull=True))
            took = time.monotonic() - t0
            peak = rss.stop()
            bad = [why for ok, why, _ in results if not ok]
            pulls = max(p for _, _, p in results)
            failures += [f"{sn} rep {rep}: {why}" for why in bad]
            accept, starts = restart_under_load(env, sn, ref, n, rep)
            print(f"rep {rep} {sn}: N={n} round {took * 1000:.0f} ms ({n - len(bad)}/{n} ok; the last rpull done at "
                  f"{pulls * 1000:.0f} ms), peak RSS {peak / 1024:.0f} MB, "
                  f"restart-to-accept {accept * 1000:.0f} ms ({starts} start{'s' if starts > 1 else ''})", flush=True)
            if not bad:
                got[sn]["round"].append(took)
                got[sn]["runs"].append(took - pulls)
            got[sn]["rss"].append(peak / 1024)
            got[sn]["accept"].append(accept)
    anchor(env, "daemons")  # leave both on empty state, as a normal run does
    med = {sn: {k: statistics.median(v) if v else float("nan") for k, v in d.items()} for sn, d in got.items()}
    ref_, ours = med["stargz"], med["lazybuild"]
    print(f"\n| N = {n}, {case}, loopback | reference (stargz) | lazybuild | ratio | goal |\n|---|---|---|---|---|")
    print(f"| round time | {ref_['round'] * 1000:.0f} ms | {ours['round'] * 1000:.0f} ms | {ours['round'] / ref_['round']:.2f}x | <= 1.0x |")
    print(f"| of which after the last rpull | {ref_['runs'] * 1000:.0f} ms | {ours['runs'] * 1000:.0f} ms | "
          f"{ours['runs'] / ref_['runs']:.2f}x | |")
    print(f"| peak RSS | {ref_['rss']:.0f} MB | {ours['rss']:.0f} MB | {ours['rss'] / ref_['rss']:.2f}x | <= 1.2x |")
    print(f"| restart to accept | {ref_['accept'] * 1000:.0f} ms | {ours['accept'] * 1000:.0f} ms | "
          f"{ours['accept'] / ref_['accept']:.2f}x | <= 1 s |")
    print(f"(median of {reps}; failed starts: {len(failures)})" + "".join("\n  " + f for f in failures))
    met = (ours["round"] <= ref_["round"] and ours["rss"] <= 1.2 * ref_["rss"] and ours["accept"] <= 1.0 and not failures)
    print("goal:", "MET" if met else "NOT MET")
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
