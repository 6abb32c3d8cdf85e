"""`--optimize`: order each new layer by what the image's workload reads first, as `ctr-remote image
optimize` does. The pushed image is mounted lazily with access recording, its workload (ENTRYPOINT/CMD
or the command given) runs under runc on an overlay of it for a period, and the record — first reads,
per layer, in order — becomes each layer's prioritized files (before `.prefetch.landmark`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from lazybuild.build import runc
from lazybuild.build.overlay import mount_overlay, unmount


def record_workload(ref: str, config: dict, args: list[str], period_s: float, *, insecure: bool = False,
                    chunk_cache: str = "/var/cache/lazybuild", log=print) -> dict[int, list[str]]:
    """Run the workload of image REF for PERIOD_S seconds; the paths it read, per layer index."""
    cfg = config.get("config") or {}
    argv = list(args) or list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
    if not argv:
        raise ValueError("--optimize: the image has no ENTRYPOINT or CMD; give the workload after `--`")
    work = tempfile.mkdtemp(prefix="lazybuild-optimize-")
    mnt, merged = os.path.join(work, "image"), os.path.join(work, "merged")
    upper, wdir = os.path.join(work, "upper"), os.path.join(work, "work")
    for d in (mnt, merged, upper, wdir):
        os.makedirs(d)
    record = os.path.join(work, "record.ndjson")
    cmd = [sys.executable, "-m", "lazybuild.cli", "mount", ref, mnt, "--layers", "--daemon", "--no-prefetch",
           "--no-background-fetch", "--record", record, "--cache", chunk_cache]
    if insecure:
        cmd.append("--insecure")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"--optimize: cannot mount {ref}: {p.stderr.strip()}")
    mounted = False
    try:
        layers = sorted((int(n) for n in os.listdir(mnt)), reverse=True)
        mount_overlay([os.path.join(mnt, str(n)) for n in layers], upper, wdir, merged)
        mounted = True
        log(f"optimize: running {json.dumps(argv)} for {period_s:g} s")
        try:
            runc.run(merged, argv, list(cfg.get("Env") or []), cfg.get("WorkingDir") or "/", cfg.get("User") or "",
                     [], network="host", output=lambda line: log("  | " + line), timeout_s=period_s)
        except runc.RunError as e:  # a workload that exits non-zero still read what it read
            log(f"optimize: the workload exited with code {e.code}")
    finally:
        if mounted:
            unmount(merged)
        subprocess.run([sys.executable, "-m", "lazybuild.cli", "umount", mnt], capture_output=True)
    out: dict[int, list[str]] = {}
    try:
        with open(record) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                out.setdefault(int(rec.get("layer", 0)), []).append(rec["path"])
    except OSError:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
