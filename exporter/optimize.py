"""`--optimize`: order each new layer by what the image's workload reads first, as `ctr-remote image
optimize` does. The pushed image is mounted lazily with access recording, its workload (ENTRYPOINT/CMD
or the command given) runs under runc on an overlay of it for a period, and the record — first reads,
per layer, in order — becomes each layer's prioritized files (before `.prefetch.landmark`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from lazybuild import mounter
from lazybuild.defaults import CACHE_DIR
from lazybuild.errors import MountError, UsageError
from lazybuild.runtime import runc
from lazybuild.runtime.overlay import mount_overlay, unmount


def record_workload(ref: str, config: dict, args: list[str], period_s: float, *, insecure: bool = False,
                    chunk_cache: str = CACHE_DIR, log=print, platform=None) -> dict[int, list[str]]:
    """Run the workload of image REF for PERIOD_S seconds; the paths it read, per layer index. REF is a
    registry reference (`lazybuild optimize` serves a local image on loopback for this, see
    lazybuild.localregistry); PLATFORM picks from a multi-platform image."""
    cfg = config.get("config") or {}
    argv = list(args) or list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
    if not argv:
        raise UsageError("optimize: the image has no ENTRYPOINT or CMD; give the workload after `--`")
    work = tempfile.mkdtemp(prefix="lazybuild-optimize-")
    mnt, merged = os.path.join(work, "image"), os.path.join(work, "merged")
    upper, wdir = os.path.join(work, "upper"), os.path.join(work, "work")
    for d in (mnt, merged, upper, wdir):
        os.makedirs(d)
    record = os.path.join(work, "record.ndjson")
    opts = mounter.MountOptions(cache_dir=chunk_cache, prefetch=False, background_fetch=False, layers=True,
                                record=record, insecure=insecure, platform=platform)
    try:
        image = mounter.mount_image(ref, mnt, opts)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise MountError(f"optimize: cannot mount {ref}: {e}") from None
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
        image.close()
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
