"""containerd's snapshots gRPC API on top of Snapshotter: message translation and error codes only.

containerd's proxy client maps gRPC codes back to its errdefs (AlreadyExists -> ErrAlreadyExists, which
its unpacker reads as "the remote snapshotter has this layer"), so each SnapshotError code becomes the
matching status here.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from google.protobuf import empty_pb2

from lazybuild.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc

from .snapshots import Mount, Snapshotter
from .store import Snapshot, SnapshotError

log = logging.getLogger("lazybuild.snapshotter")

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
LIST_BATCH = 100  # infos per List message, as containerd's own service sends them


def _mounts(ms: list[Mount]) -> list:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in ms]


def _info(s: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(name=s.key, parent=s.parent, kind=s.kind, labels=s.labels)
    info.created_at.FromNanoseconds(int(s.created * 1e9))
    info.updated_at.FromNanoseconds(int(s.updated * 1e9))
    return info


def _rpc(fn):
    """Run one RPC: SnapshotErrors become their status; anything else is INTERNAL with its message."""
    @functools.wraps(fn)
    def wrapper(self, request, context):
        started = time.monotonic()
        try:
            return fn(self, request, context)
        except SnapshotError as e:
            if e.code != "already_exists":
                log.info("%s: %s", fn.__name__, e)
            context.abort(_CODES[e.code], str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {type(e).__name__}: {e}")
        finally:
            log.debug("%s %s: %.1f ms", fn.__name__, getattr(request, "key", "") or getattr(request, "name", ""),
                      (time.monotonic() - started) * 1000)
    return wrapper


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter):
        self.sn = sn

    @_rpc
    def Prepare(self, request, context):
        return snapshots_pb2.PrepareSnapshotResponse(
            mounts=_mounts(self.sn.prepare(request.key, request.parent, dict(request.labels))))

    @_rpc
    def View(self, request, context):
        return snapshots_pb2.ViewSnapshotResponse(
            mounts=_mounts(self.sn.view(request.key, request.parent, dict(request.labels))))

    @_rpc
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request, context):
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request, context):
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request, context):
        snap = self.sn.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(snap))

    def List(self, request, context):
        try:
            snaps = self.sn.list(list(request.filters))
        except SnapshotError as e:
            context.abort(_CODES[e.code], str(e))
        for i in range(0, len(snaps), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in snaps[i:i + LIST_BATCH]])

    @_rpc
    def Usage(self, request, context):
        size, inodes = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request, context):
        freed = self.sn.cleanup()
        if freed:
            log.info("cleanup freed %d bytes of cached chunks", freed)
        return empty_pb2.Empty()
