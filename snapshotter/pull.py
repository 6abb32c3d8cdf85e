"""`lazybuild rpull`: pull an image into containerd so that a remote snapshotter can serve its layers
lazily — what `ctr-remote images rpull` does, without the reference tool.

Through containerd's API (its socket, a namespace, a lease that protects what is written until the image
record holds it): the manifest and config go into containerd's content store (with the garbage-collection
labels containerd's own pull sets); each layer is prepared on the snapshotter with
`containerd.io/snapshot.ref` = its chain ID and the labels of the remote-snapshot flow
(`containerd.io/snapshot/remote/stargz.reference|.digest|.layers` plus the layer's `containerd.io/snapshot/`
annotations, among them its TOC digest). A snapshotter that serves the layer answers AlreadyExists; for any
other answer the layer is downloaded (digest checked) into the content store, unpacked by containerd's diff
service into the prepared snapshot and committed. Last, the image record is created or updated.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
import tempfile

import grpc

from lazybuild.image import Descriptor, Platform
from lazybuild.registry import Reference, Registry
from lazybuild.errors import RemoteError
from lazybuild.snapshotter.proto import (content_pb2, content_pb2_grpc, descriptor_pb2, diff_pb2, diff_pb2_grpc,
                                         images_pb2, images_pb2_grpc, leases_pb2, leases_pb2_grpc, snapshots_pb2,
                                         snapshots_pb2_grpc)

from .remote import REF_LABEL

log = logging.getLogger("lazybuild.rpull")
STARGZ_REF, STARGZ_DIGEST, STARGZ_LAYERS = (f"containerd.io/snapshot/remote/stargz.{k}" for k in ("reference", "digest",
                                                                                                    "layers"))
WRITE_PIECE = 1 << 20  # content Write messages stay far below containerd's 16 MiB message limit
LABEL_VALUE_MAX = 4096  # containerd refuses longer labels; the layers label is cut to fit, as ctr-remote does


class PullError(RemoteError):
    pass


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def layer_labels(reference: str, layers: list[Descriptor], i: int, chain: str) -> dict[str, str]:
    labels = {k: v for k, v in layers[i].annotations.items() if k.startswith("containerd.io/snapshot/")}
    neighbours = ""
    for layer in layers[i:]:
        if len(neighbours) + len(layer.digest) + 1 > LABEL_VALUE_MAX:
            break
        neighbours += ("," if neighbours else "") + layer.digest
    labels.update({REF_LABEL: chain, STARGZ_REF: reference, STARGZ_DIGEST: layers[i].digest, STARGZ_LAYERS: neighbours})
    return labels


class Containerd:
    """Calls on containerd's socket in one namespace (and, once created, one lease)."""

    def __init__(self, address: str, namespace: str):
        self.address = address
        self.channel = grpc.insecure_channel("unix://" + os.path.abspath(address),
                                             options=[("grpc.max_receive_message_length", 16 << 20)])
        self.metadata = [("containerd-namespace", namespace)]
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method, request, what: str):
        try:
            return method(request, metadata=self.metadata, timeout=600)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "").lower():
                raise PullError(f"containerd at {self.address} is not reachable ({what}: {e.details()}); is it "
                                "running, and is this its socket (--address)?") from None
            raise

    def write(self, data_pieces, total: int, digest: str, labels: dict[str, str]) -> None:
        """Stream a blob into the content store; already present is fine (its labels are then kept)."""
        ref = f"lazybuild-rpull-{digest}"

        def requests():
            offset = 0
            for piece in data_pieces:
                yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=total, expected=digest,
                                                      offset=offset, data=piece)
                offset += len(piece)
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=total, expected=digest,
                                                  offset=offset, labels=labels)
        try:
            for _ in self.content.Write(requests(), metadata=self.metadata, timeout=600):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise PullError(f"writing {digest} to containerd's content store: {e.details()}") from None


def _desc(d: Descriptor, media_type: str | None = None) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=media_type or d.media_type, digest=d.digest, size=d.size)


def rpull(ref_text: str, address: str, namespace: str = "default", snapshotter: str = "lazybuild",
          platform: Platform | None = None, insecure: bool = False, name: str | None = None) -> dict:
    ref = Reference.parse(ref_text)
    report = {"image": name or str(ref), "layers": []}
    with Registry(ref.host, insecure=insecure) as reg:
        resolved = reg.resolve(ref, platform)
        manifest = resolved.manifest
        config_raw = reg.read_blob(ref.repository, manifest.config.digest, size=manifest.config.size)
        diff_ids = json.loads(config_raw).get("rootfs", {}).get("diff_ids") or []
        if len(diff_ids) != len(manifest.layers):
            raise PullError(f"{ref}: the config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        chains = chain_ids(diff_ids)
        ctd = Containerd(address, namespace)
        lease = f"lazybuild-rpull-{secrets.token_hex(6)}"
        expire = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        ctd.call(ctd.leases.Create, leases_pb2.CreateRequest(id=lease, labels={"containerd.io/gc.expire": expire}),
                 "lease")
        ctd.metadata.append(("containerd-lease", lease))
        try:
            # config, then the manifest that refers to it and to the layers (GC labels as containerd's pull)
            config_labels = {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {}
            ctd.write([config_raw], len(config_raw), manifest.config.digest, config_labels)
            manifest_labels = {"containerd.io/gc.ref.content.config": manifest.config.digest}
            manifest_labels.update({f"containerd.io/gc.ref.content.l.{i}": l.digest for i, l in enumerate(manifest.layers)})
            ctd.write([manifest.raw], len(manifest.raw), manifest.digest, manifest_labels)
            parent = ""
            for i, layer in enumerate(manifest.layers):
                report["layers"].append({"digest": layer.digest, "chainID": chains[i],
                                         "how": _unpack(ctd, reg, ref, snapshotter, manifest.layers, i, chains[i], parent)})
                parent = chains[i]
            image = images_pb2.Image(name=report["image"], target=_desc(Descriptor(manifest.media_type, manifest.digest,
                                                                                   len(manifest.raw))))
            try:
                ctd.call(ctd.images.Create, images_pb2.CreateImageRequest(image=image), "image")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                ctd.call(ctd.images.Update, images_pb2.UpdateImageRequest(image=image), "image")
        finally:
            try:
                ctd.leases.Delete(leases_pb2.DeleteRequest(id=lease), metadata=ctd.metadata[:1], timeout=60)
            except grpc.RpcError as e:
                log.warning("could not delete lease %s (it expires by itself at %s): %s", lease, expire, e.details())
            ctd.close()
    report["digest"] = manifest.digest
    return report


def _unpack(ctd: Containerd, reg: Registry, ref: Reference, snapshotter: str, layers: list[Descriptor], i: int,
            chain: str, parent: str) -> str:
    """One layer: already there, served remotely, or downloaded + applied + committed. Returns which."""
    try:
        ctd.call(ctd.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=chain), "stat")
        return "present"
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
    key = f"extract-{secrets.token_hex(6)} {chain}"
    labels = layer_labels(str(ref), layers, i, chain)
    try:
        prepared = ctd.call(ctd.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels), "prepare")
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            return "lazy"
        raise PullError(f"preparing layer {i} ({layers[i].digest}) on snapshotter {snapshotter!r}: {e.details()}") from None
    try:
        layer = layers[i]
        with tempfile.TemporaryFile() as tmp:
            reg.fetch_blob(ref.repository, layer.digest, tmp)  # digest checked by the client

            def pieces():
                tmp.seek(0)
                while piece := tmp.read(WRITE_PIECE):
                    yield piece
            ctd.write(pieces(), layer.size, layer.digest, {})
        ctd.call(ctd.diff.Apply, diff_pb2.ApplyRequest(diff=_desc(layer), mounts=prepared.mounts), "apply")
        ctd.call(ctd.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=chain, key=key, labels={REF_LABEL: chain}), "commit")
    except BaseException:
        try:
            ctd.snapshots.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                                 metadata=ctd.metadata, timeout=60)
        except grpc.RpcError:
            pass
        raise
    return "downloaded"
