"""Mounting an image: `lazybuild mount` / `umount` / `mount --status`, and mount_image() for the
builder and the optimizer (the mount served by a forked child).

At mount: resolve the image, open every layer in parallel (footer+TOC, TOC digests checked against
the manifest annotations), plan each layer's prefetch of `[0, .prefetch.landmark)`, then serve while
it streams. The rest is fetched in the background when no reads are waiting. SIGTERM/SIGINT or
`lazybuild umount` unmount cleanly. Per-layer byte counts are written to a status file while mounted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lazybuild.defaults import CACHE_DIR
from lazybuild.digest import digest_hex
from lazybuild.errors import require_extra
from lazybuild.estargz import TOC_DIGEST_ANNOTATION
from lazybuild.image import Manifest, Platform
from lazybuild.registry import Reference, Registry, Resolved

from .cache import DEFAULT_LIMIT_BYTES, ChunkCache
from .fetch import open_layer
from .prefetch import FilePrefetch, Prefetch, background_fetch
from .rootfs import LayersTree, MergedTree

log = logging.getLogger("lazybuild.mount")
STATUS_DIR = os.environ.get("LAZYBUILD_RUN", "/run/lazybuild") + "/mounts"


@dataclass
class MountOptions:
    """How to mount an image (the flags of `lazybuild mount`)."""
    platform: Platform | None = None
    cache_dir: str = CACHE_DIR
    cache_limit_bytes: int = DEFAULT_LIMIT_BYTES
    prefetch: bool = True
    background_fetch: bool = True
    verify: bool = True
    record: str | None = None
    insecure: bool = False
    timeout_s: float = 30.0
    layers: bool = False  # one directory per layer instead of the merged tree
    # The manifest of a reference pinned by digest, when the caller has it already (checked against the
    # digest here): the mount asks the registry only for the layers.
    manifest: Manifest | None = None
    # layer digest -> file names in it to fetch at once, before reads ask (a build profile): their chunks in a
    # few merged Range requests; reads of them wait for those rather than fetch them again
    prefetch_files: dict[str, list[str]] | None = None


def status_path(mountpoint: str) -> str:
    """Where the mount at `mountpoint` keeps its status (and, beside it, the log of a forked mount)."""
    return os.path.join(STATUS_DIR, hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16] + ".json")


def open_image(ref_text: str, opts: MountOptions) -> tuple[MergedTree, Registry, dict]:
    """The image's tree (merged, or one directory per layer), the registry client its reads use (the
    caller closes it), and what the status reports about the image."""
    ref = Reference.parse(ref_text)
    registry = Registry(ref.host, insecure=opts.insecure, timeout_s=opts.timeout_s)
    timings = []  # phases on the system-wide monotonic clock, for the caller's --debug-timings

    def timed(name, fn, *args):
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            timings.append({"name": name, "start": start, "duration": time.monotonic() - start})

    try:
        if opts.manifest is not None and ref.digest and opts.manifest.digest == ref.digest:
            resolved = Resolved(ref, opts.manifest)
        else:
            resolved = timed("resolve", registry.resolve, ref, opts.platform)
        cache = ChunkCache(opts.cache_dir, opts.cache_limit_bytes)
        layers_desc = resolved.manifest.layers

        def open_all():
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(layers_desc)))) as pool:
                # The TOC reads are kept beside the chunk cache (by layer digest, checked where the manifest
                # was parsed): a later mount of the same layer reads them from disk, verified against the
                # manifest's TOC digest like a fetch. Unverifiable layers (no TOC digest) are not kept.
                def toc_dir(desc):
                    if not desc.annotations.get(TOC_DIGEST_ANNOTATION):
                        return None
                    return os.path.join(opts.cache_dir, "tocs", "sha256-" + digest_hex(desc.digest))

                return list(pool.map(lambda a: open_layer(registry, ref.repository, a[1], cache, opts.cache_dir,
                                                          a[0], opts.verify, toc_dir(a[1])), enumerate(layers_desc)))

        layers = timed("open layers (footer, TOC fetch and index)", open_all)
    except BaseException:
        registry.close()
        raise
    info = {"reference": str(resolved.reference), "manifest": resolved.manifest.digest}
    tree = timed("tree", LayersTree if opts.layers else MergedTree, layers)
    info["timings"] = timings
    return tree, registry, info


def write_status(mountpoint: str, tree: MergedTree, info: dict) -> None:
    path = status_path(mountpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = {**info, "mountpoint": os.path.realpath(mountpoint), "pid": os.getpid(),
           "layers": [layer.stats.to_json() for layer in tree.layers]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def serve(ref_text: str, mountpoint: str, opts: MountOptions) -> int:
    """Mount in this process and serve until unmounted or signalled."""
    import trio

    from .fs import FuseMount

    tree, registry, info = open_image(ref_text, opts)
    # Prefetch streams while the mount already serves: its chunks are locked first (Prefetch), so a read
    # of a prefetched file waits for the stream to reach it rather than racing it with a request of its own.
    prefetches = [Prefetch(layer) for layer in tree.layers] if opts.prefetch else []
    try:  # a profile's files: locked the same way, past the chunks the landmark prefetch holds
        wanted = opts.prefetch_files or {}
        landmark = {p.layer.index: {p.layer.cache_key(c) for c in p.chunks} for p in prefetches}
        files = [FilePrefetch(layer, wanted[layer.stats.digest], landmark.get(layer.index, set()))
                 for layer in tree.layers if wanted.get(layer.stats.digest)]
    except BaseException:
        for p in prefetches:
            p.cancel()
        registry.close()
        raise
    if wanted:
        info["filePrefetch"] = _file_prefetch_status(files, False)
    try:
        fuse = FuseMount(tree, mountpoint, "lazybuild", opts.record)
    except BaseException:  # no prefetch will run to release them
        for p in prefetches + files:
            p.cancel()
        registry.close()
        raise
    stop = threading.Event()
    workers = []
    for p in prefetches:
        t = threading.Thread(target=p.run, daemon=True, name=f"prefetch-{p.layer.index}")
        t.start()
        workers.append(t)
    files_done = threading.Event()
    if files:
        def run_files():
            for f in files:  # layers one after another: each already has FILES_PARALLEL requests in flight
                f.run()
            files_done.set()
            info["filePrefetch"] = _file_prefetch_status(files, True)
            log.info("file prefetch: %d files, %d chunks in %d requests, %d bytes", info["filePrefetch"]["files"],
                     info["filePrefetch"]["chunks"], info["filePrefetch"]["requests"], info["filePrefetch"]["bytes"])

        t = threading.Thread(target=run_files, daemon=True, name="prefetch-files")
        t.start()
        workers.append(t)
    if opts.background_fetch:
        def background():  # the rest of each layer, once the prefetch no longer needs the link
            for t in workers:
                t.join()
            for layer in tree.layers:
                threading.Thread(target=background_fetch, args=(layer, stop), daemon=True,
                                 name=f"bg-{layer.index}").start()

        threading.Thread(target=background, daemon=True, name="bg-start").start()

    async def main():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        fuse.stop()
                        return

            async def status_loop():
                while True:
                    if files:  # live counts; `done` once run_files has finished
                        info["filePrefetch"] = _file_prefetch_status(files, files_done.is_set())
                    await trio.to_thread.run_sync(write_status, mountpoint, tree, info)
                    await trio.sleep(0.25)

            nursery.start_soon(on_signal)
            nursery.start_soon(status_loop)
            await fuse.serve()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        stop.set()
        fuse.close()
        write_status(mountpoint, tree, info)
        registry.close()
    return 0


def _file_prefetch_status(files: list[FilePrefetch], done: bool) -> dict:
    """What the status reports of the file prefetch (`filePrefetch`)."""
    return {"files": sum(f.files for f in files), "chunks": sum(f.planned for f in files),
            "requests": sum(f.requests for f in files),
            "bytes": sum(f.fetched_bytes for f in files), "failedChunks": sum(f.failed for f in files), "done": done}


def is_mounted(path: str) -> bool:
    """Whether something is mounted at `path` (per this process's mount table)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def umount(mountpoint: str) -> None:
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        r2 = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
        if r2.returncode != 0:
            raise OSError(f"cannot unmount {mountpoint}: {r.stderr.strip() or r2.stderr.strip()}")


def status(mountpoint: str) -> dict:
    try:
        with open(status_path(mountpoint)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise OSError(f"{mountpoint} is not a lazybuild mount (no status at {status_path(mountpoint)})") from None


class MountedImage:
    """An image mounted by a child of this process (see mount_image); closing it unmounts."""

    def __init__(self, mountpoint: str, pid: int, log_path: str, detach: bool = False):
        self.mountpoint = mountpoint
        self.pid = pid
        self.log_path = log_path
        self.detach = detach
        self.up = False

    def wait_until_mounted(self, timeout_s: float = 120.0) -> None:
        """Return once the child serves the mount; OSError with the child's log if it failed or timed out."""
        deadline = time.monotonic() + timeout_s
        while not self.up and time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                self.up = True
                if self.detach:
                    self.pid = 0  # not ours to reap: init adopts it when we exit
                return
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.pid = 0
                with open(self.log_path) as f:
                    raise OSError(f"mount failed: {f.read().strip()}")
            time.sleep(0.01)
        if not self.up:
            os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
            self.pid = 0
            raise OSError(f"mount of {self.mountpoint} did not come up in {timeout_s:.0f} s (log: {self.log_path})")

    def status(self) -> dict:
        """Per layer: size, bytes fetched, served from cache, prefetched (as `mount --status`)."""
        return status(self.mountpoint)

    def close(self, timeout_s: float = 30.0) -> None:
        """Unmount and reap the child (it flushes its status and exits once the kernel lets go)."""
        if self.pid == 0:
            return
        if is_mounted(self.mountpoint):
            try:
                umount(self.mountpoint)
            except OSError:
                os.kill(self.pid, signal.SIGTERM)
        else:  # still coming up (never waited for): stop it before it serves
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = 0
        if is_mounted(self.mountpoint):  # a child stopped between its FUSE init and serving leaves the mount
            try:
                umount(self.mountpoint)
            except OSError:
                pass


def mount_image(ref_text: str, mountpoint: str, opts: MountOptions, timeout_s: float = 120.0,
                detach: bool = False, wait: bool = True) -> MountedImage:
    """Mount REF at MOUNTPOINT from a forked child of this process and return once it serves (without
    WAIT: at once, and the caller does other work before `wait_until_mounted()`).

    pyfuse3 serves one mount per process, so each mount is a child; forking (rather than starting
    `python -m ...`) costs no interpreter start or imports and does not depend on the current
    directory's sys.path. DETACH puts the child in its own session (`lazybuild mount --daemon`, which
    outlives us); otherwise it stays ours, and `close()` unmounts it and reaps it.
    """
    require_extra("pyfuse3", f"mounting {ref_text}")  # here, not in the child, whose errors only reach a log
    log_path = status_path(mountpoint).replace(".json", ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: serve until unmounted, never return into the caller's code
        code = 1
        try:
            if detach:
                os.setsid()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL if detach else signal.SIG_IGN)  # the parent unmounts us
            logging.basicConfig(level=logging.INFO, format="lazybuild mount: %(message)s", stream=sys.stderr,
                                force=True)
            logging.getLogger("httpx").setLevel(logging.WARNING)
            code = serve(ref_text, mountpoint, opts)
        except BaseException as e:  # noqa: BLE001 - reported in the log the parent reads
            print(f"lazybuild: error: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    handle = MountedImage(mountpoint, pid, log_path, detach)
    if wait:
        handle.wait_until_mounted(timeout_s)
    return handle
