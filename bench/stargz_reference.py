"""The reference a BuildKit user with lazy pulling runs on: containerd 1.6 + the stargz snapshotter that
../shared/tools/stargz-anchor/anchor-bench.sh builds (Debian's stargz-snapshotter 0.12 `service` package
behind containerd's proxy-snapshotter API, upstream defaults: prefetch and background fetch on), driven
the way anchor-bench.sh drives it, through its own phases:

- `build` (only when the binaries are missing from BIN) compiles stargz-snapshotter and ctr-remote;
- `daemons` stops this directory's containerd + snapshotter, wipes their state and starts them again.

A build step is then `ctr-remote images rpull --snapshotter stargz` of the base image (cold only) and
`ctr run --snapshotter stargz` of the RUN command with the context bind-mounted where the Dockerfile
copies it. anchor-bench.sh has no phase that stops only the daemons (its `down` also deletes its slow
link, whose namespace names are global), so `close` stops them here from its pid files, as its
`daemons_down` does.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time

from snapshotter import anchor  # bench/snapshotter.py: runs anchor-bench.sh phases with an environment

from lazybuild.testing.images import CACHE

BIN = os.path.join(CACHE, "anchor-bin")  # where bench/snapshotter.py keeps them too: built once per machine


class StargzReference:
    def __init__(self, workdir: str):
        self.a = workdir
        os.makedirs(workdir, exist_ok=True)
        self.env = {**os.environ, "A": workdir, "BIN": BIN, "SNAPSHOTTERS": "stargz", "OTHER_CMD": ""}
        self.sock = os.path.join(workdir, "containerd", "containerd.sock")
        self.ids = itertools.count()
        if not all(os.access(os.path.join(BIN, b), os.X_OK) for b in ("ctr-remote", "stargz-snapshotter")):
            anchor(self.env, "build")

    def restart_empty(self) -> None:
        """containerd + snapshotter from wiped state (anchor-bench.sh's `daemons` phase)."""
        anchor(self.env, "daemons")

    def run(self, ref: str, context: str, workdir: str, argv: list[str], out: str, pull: bool) -> float:
        """Seconds for [rpull +] `ctr run` of argv in ref with context's files at workdir and out at /out
        (a fresh host directory, so the step does its whole work every time and its output can be checked)."""
        ctr = ["ctr", "-a", self.sock]
        start = time.perf_counter()
        if pull:
            subprocess.run([os.path.join(BIN, "ctr-remote"), "-a", self.sock, "images", "rpull", "--snapshotter", "stargz",
                            "--plain-http", ref], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(ctr + ["run", "--rm", "--net-host", "--snapshotter", "stargz", "--cwd", workdir,
                              "--mount", f"type=bind,src={context},dst={workdir},options=rbind:rw",
                              "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
                              ref, f"devbuild-{os.getpid()}-{next(self.ids)}", *argv], check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop this directory's daemons and lazily unmount what they left under it (anchor's daemons_down)."""
        for name in ("containerd", "stargz"):
            pidfile = os.path.join(self.a, "pids", f"{name}.pid")
            try:
                pid = int(open(pidfile).read())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.unlink(pidfile)
        prefix = self.a.rstrip("/") + "/"
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
