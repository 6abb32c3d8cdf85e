"""`lazybuild snapshotter`: the daemon. The main thread runs the FUSE mount (pyfuse3 on trio, which also
takes SIGTERM/SIGINT); gRPC requests are served on worker threads from a unix socket.

Start: listen first (containerd redials a restarted snapshotter and waits on it), then unmount whatever
a previous run left at ROOT/fuse, mount it empty, and re-open the lazy layers the metadata store lists
in the background (from their kept TOCs; a layer whose registry cannot be reached is reported
unavailable to the snapshots that need it). Until the mount is up, requests that hand out a lazy
layer's directory wait for it; one for a layer not re-opened yet re-opens it itself. Stop: stop
serving, unmount, close the store. Per-layer byte counts go to ROOT/status.json while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

from lazybuild import mounter

from .config import Config
from .remote import LazyLayers
from .snapshots import Snapshotter

log = logging.getLogger("lazybuild.snapshotter")


def _unmount_stale(path: str) -> None:
    """A previous run that died leaves its FUSE mount behind (ENOTCONN): detach it before mounting anew."""
    if mounter.is_mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True)


def write_status(root: str, lazy: LazyLayers | None) -> None:
    doc = {"pid": os.getpid(), "time": time.time(),
           "layers": lazy.stats() if lazy else {},
           "unavailable": {str(k): v for k, v in (lazy.unavailable.items() if lazy else [])}}
    tmp = os.path.join(root, ".status.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(root, "status.json"))


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own heap (up to 8 per CPU), and memory freed in one
    is not reused by another: with gRPC workers, FUSE readers and layer builders that is RSS no
    request needs. Two arenas, set before any thread starts."""
    try:
        import ctypes

        M_ARENA_MAX = -8
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _restore(sn: Snapshotter) -> None:
    started = time.monotonic()
    restored, unavailable = sn.restore()
    if restored or unavailable:
        log.info("restored %d lazy layers, %d unavailable (%.0f ms)", restored, unavailable,
                 (time.monotonic() - started) * 1000)


def serve(address: str, root: str, cfg: Config, lazy_layers: bool = True) -> int:
    _few_malloc_arenas()
    import grpc

    from lazybuild.snapshotter.proto import snapshots_pb2_grpc

    from .service import SnapshotsService

    # containerd waits on each RPC while layers are parsed on other threads: hand the GIL over every
    # 0.5 ms instead of 5 ms, so a Stat is not queued behind a TOC being indexed
    sys.setswitchinterval(0.0005)
    root = os.path.abspath(root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    lazy = LazyLayers(root, cfg) if lazy_layers else None
    mounted = threading.Event()
    if lazy is None:
        mounted.set()
    sn = Snapshotter(root, lazy, mounted)

    os.makedirs(os.path.dirname(os.path.abspath(address)), exist_ok=True)
    if os.path.exists(address):
        os.unlink(address)
    # Every Prepare of a layer being opened holds a worker while it waits: room for containerd's other
    # calls (Stat, List, Mounts) besides 16 clients pulling at once.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    server.add_insecure_port("unix://" + os.path.abspath(address))
    server.start()
    log.info("serving containerd snapshots on %s (root %s)", address, root)

    fuse = None
    try:
        if lazy is not None:
            lazy.warm_up()
            _unmount_stale(lazy.mountpoint)
            os.makedirs(lazy.mountpoint, exist_ok=True)
            fuse = mounter.fuse_mount(lazy.tree, lazy.mountpoint, "lazybuild-snapshotter")
            mounted.set()
            threading.Thread(target=_restore, args=(sn,), daemon=True, name="restore").start()
    except BaseException:
        server.stop(grace=None)
        sn.close()
        raise

    import trio  # pyfuse3's loop; imported after the socket is served

    stopping = threading.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stopping.set()
                        if fuse is not None:
                            fuse.stop()
                        nursery.cancel_scope.cancel()
                        return

            async def status_loop():
                while True:
                    await trio.to_thread.run_sync(write_status, root, lazy)
                    await trio.sleep(0.5)

            nursery.start_soon(on_signal)
            nursery.start_soon(status_loop)
            if fuse is not None:
                await fuse.serve()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        server.stop(grace=2).wait()
        if lazy is not None:
            write_status(root, lazy)
            lazy.close()
        if fuse is not None:
            fuse.close()
        sn.close()
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
    return 0
