"""containerd 1.6 (Debian) with its own root, state and socket, `lazybuild snapshotter` as its proxy
plugin `lazybuild` (or another name: BuildKit's containerd worker takes its remote-snapshot path only
for `stargz`), and the reference client `ctr-remote` (built by
../shared/tools/stargz-anchor/anchor-bench.sh build (LAZYBUILD_SHARED), kept in the test cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from lazybuild.testing.images import CACHE
from lazybuild.testing.procs import stop_process
from support import SHARED

ANCHOR = os.path.join(SHARED, "tools", "stargz-anchor", "anchor-bench.sh")
ANCHOR_BIN = os.path.join(CACHE, "anchor-bin")


def ctr_remote() -> str:
    """The reference client, built once from Debian's stargz-snapshotter source and kept."""
    path = os.path.join(ANCHOR_BIN, "ctr-remote")
    if not os.access(path, os.X_OK):
        os.makedirs(ANCHOR_BIN, exist_ok=True)
        subprocess.run(["bash", ANCHOR, "build"], check=True, capture_output=True,
                       env={**os.environ, "BIN": ANCHOR_BIN, "A": os.path.join(CACHE, "anchor-work")})
    return path


def wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up in {timeout_s:.0f} s")


class Snapshotter:
    def __init__(self, workdir: str, config: str | None = None):
        self.workdir = workdir
        self.root = os.path.join(workdir, "root")
        self.sock = os.path.join(workdir, "snapshotter.sock")
        self.config = config
        self.proc = None
        self.log_path = os.path.join(workdir, "snapshotter.log")

    def start(self) -> None:
        # LAZYBUILD_SNAPSHOTTER_ARGS="--log-level debug" shows per-RPC and per-fetch timings in the log
        cmd = [sys.executable, "-I", "-m", "lazybuild.cli", "snapshotter", "--address", self.sock, "--root", self.root] + \
            os.environ.get("LAZYBUILD_SNAPSHOTTER_ARGS", "").split()
        if self.config is None:  # fetch only what is read, so tests can count it
            self.config = os.path.join(self.workdir, "config.toml")
            with open(self.config, "w") as f:
                f.write("background_fetch = false\n")
        cmd += ["--config", self.config]
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 60, "snapshotter socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"snapshotter exited: {self.logs()}")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self.log.close()
        self.proc = None

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def status(self) -> dict:
        """ROOT/status.json as written after this call (the daemon rewrites it every 0.5 s)."""
        asked = time.time()
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(os.path.join(self.root, "status.json")) as f:
                    doc = json.load(f)
                if doc["time"] > asked or time.monotonic() > deadline:
                    return doc
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


class Containerd:
    def __init__(self, workdir: str, snapshotter_sock: str, plugin: str = "lazybuild"):
        self.workdir = workdir
        self.plugin = plugin  # the proxy plugin's name: what clients pass as `snapshotter`
        self.sock = os.path.join(workdir, "containerd.sock")
        self.config = os.path.join(workdir, "config.toml")
        with open(self.config, "w") as f:
            f.write(f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = "{workdir}/debug.sock"
[metrics]
  address = ""
[proxy_plugins]
  [proxy_plugins.{plugin}]
    type = "snapshot"
    address = "{snapshotter_sock}"
""")
        self.log = open(os.path.join(workdir, "containerd.log"), "a")
        self.proc = subprocess.Popen(["containerd", "--config", self.config], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, 60, "containerd")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["ctr", "-a", self.sock] + list(args), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def ctr_remote(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([ctr_remote(), "-a", self.sock] + list(args), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr-remote {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def reconnected(self, timeout_s: float = 30) -> None:
        """Wait until containerd talks to a restarted snapshotter again (its proxy client redials with
        a backoff of up to a few seconds; calls in between fail with "Error while dialing")."""
        wait_for(lambda: self.ctr("snapshots", "--snapshotter", self.plugin, "ls", check=False).returncode == 0,
                 timeout_s, "containerd's connection to the restarted snapshotter")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        # containerd leaves its shims' rootfs mounts only if a task is still running; none should be
        for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
            mnt = line.split()[4]
            if mnt.startswith(self.workdir + "/"):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(os.path.join(self.workdir, "root"), ignore_errors=True)


def lazybuild_mounts(root: str) -> list[str]:
    """Mount points under a snapshotter root (FUSE or overlay)."""
    real = os.path.realpath(root)
    return [line.split()[4] for line in open("/proc/self/mountinfo").read().splitlines()
            if line.split()[4].startswith(real + "/") or line.split()[4] == real]
