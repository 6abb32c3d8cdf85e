"""`lazybuild snapshotter` as BuildKit's `stargz`: BuildKit's exact call sequence, replayed against a real
containerd 1.6 whose proxy plugin `stargz` is our snapshotter.

Facts from upstream (moby/buildkit v0.11.6, containerd v1.6.20; read, not copied):

- BuildKit's containerd worker talks to containerd's snapshots service (the metadata snapshotter, not
  the plugin's socket) in namespace `buildkit` (cmd/buildkitd/main_containerd_worker.go,
  snapshot/containerd/snapshotter.go wraps every call in it) and takes the remote-snapshot path only when
  the snapshotter is named `stargz` (cache/refs.go: `sr.cm.Snapshotter.Name() == "stargz"` in
  immutableRef.Mount/Extract, mutableRef.Mount, cache/manager.go New).
- A pulled layer's descHandler carries SnapshotLabels (source/containerimage/pull.go): the layer's
  annotations under `containerd.io/snapshot/` plus util/estargz/labels.go's SnapshotLabels:
  `containerd.io/snapshot/stargz/toc.digest` (the annotation, or "" when the layer has none: every plain
  gzip layer sends it empty), `io.containers.estargz.uncompressed-size` (dropped by FilterInheritedLabels),
  `containerd.io/snapshot/remote/stargz.reference` (the image ref), `.digest` (the layer) and `.layers`
  (this layer and those above it, comma-separated, cut to containerd's 4096-byte label limit).
- A layer's snapshot ID is its chain ID (cache/manager.go GetByBlob), its parent the layer below's.
- makeTmpLabelsStargzMode: every label `k` becomes `k.<id>` (one random id per call) with update field
  `labels.k.<id>`, plus `containerd.io/snapshot/remote/stargz.session.<i>.<id>` = each session ID.
- Extract (cache/refs.go) = withRemoteSnapshotLabelsStargzMode(prepareRemoteSnapshotsStargzMode; unlazy):
  1. withRemoteSnapshotLabelsStargzMode, per layer bottom-up: Stat(snapshotID); NotFound or no
     `containerd.io/snapshot/remote` label: skip; else Update(info{labels = tmp labels}, tmp fields).
     Deferred, after the wrapped work: the same Update with every tmp value "" (containerd's metadata store
     drops empty labels and passes the backend the fields with the keys gone).
  2. prepareRemoteSnapshotsStargzMode, per layer bottom-up: Stat(snapshotID) found: next layer. Else
     Prepare(key "tmp-<id> <chainID>", parent = the layer below's snapshot ID, labels = the SnapshotLabels +
     `containerd.io/snapshot.ref` = snapshotID + the tmp labels). AlreadyExists and then Stat(snapshotID)
     found: remote, next layer (deferred: Update(Stat's info with the tmp values "", tmp fields)). Any other
     answer, success included: stop; this layer and those above are unlazied.
  3. unlazy: Stat(top snapshotID) found: done. Else per layer (parents first): fetch the blob,
     Prepare("extract-<id> <chainID>", parent), Mounts, diff Apply, Commit(snapshotID, key).
- containerd's metadata snapshotter (metadata/snapshot.go createSnapshot) on a backend AlreadyExists with a
  snapshot.ref: Walk(`labels."containerd.io/snapshot.ref"==<target>,parent==<backend parent>`), records the
  target with the Prepare's labels merged with the backend's, and answers AlreadyExists; it also adds the
  target to the call's lease.
- Mount of an immutable ref (cacheRecord.mount): View("<snapshotID>-view", snapshotID), wrapped in step 1.
  Whether a ref is lazy (isLazy): Stat(snapshotID) carries `containerd.io/snapshot/remote`.
- stargz-snapshotter (snapshot/snapshot.go Prepare) answers a layer it cannot serve with an ordinary
  active snapshot (no error); BuildKit reads that as "not remote" (step 2) and unlazies. Ours does the same.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
import time

import grpc
import pytest

from lazybuild.image import Descriptor
from lazybuild.registry import Reference, Registry
from lazybuild.snapshotter.proto import diff_pb2, leases_pb2, snapshots_pb2, snapshots_pb2_grpc
from lazybuild.snapshotter.pull import Containerd as ContainerdAPI, chain_ids
from lazybuild.testing.images import docker_archive
from lazybuild.testing.registry import RegistryProcess
from support.containerd import Containerd, Snapshotter, lazybuild_mounts
from support.registry import FaultProxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containerd, FUSE and overlayfs need root")
LAZYBUILD = [sys.executable, "-I", "-m", "lazybuild.cli"]
NAMESPACE = "buildkit"  # BuildKit's containerd worker default
PLUGIN = "stargz"  # the only name BuildKit's containerd worker treats as a remote snapshotter
REF_LABEL = "containerd.io/snapshot.ref"
REMOTE_LABEL = "containerd.io/snapshot/remote"
TOC_LABEL = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_LABEL = "io.containers.estargz.uncompressed-size"
STARGZ = "containerd.io/snapshot/remote/stargz."
BASE_FILES = 48  # 48 x 64 KiB of random bytes: the base layer is ~3 MiB compressed, a lazy open reads far less


def lazybuild(*args: str) -> str:
    r = subprocess.run(LAZYBUILD + list(args), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return r.stdout


def layer_tar(path: str, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


# --- what BuildKit computes -------------------------------------------------------------------------------------

def inherited(labels: dict[str, str]) -> dict[str, str]:
    """containerd's snapshots.FilterInheritedLabels."""
    return {k: v for k, v in labels.items() if k == REF_LABEL or k.startswith("containerd.io/snapshot/")}


def snapshot_labels(ref: str, layers: list[Descriptor], i: int) -> dict[str, str]:
    """A descHandler's SnapshotLabels (source/containerimage/pull.go + util/estargz/labels.go)."""
    labels = inherited(layers[i].annotations)
    labels[TOC_LABEL] = layers[i].annotations.get(TOC_LABEL, "")
    labels[UNCOMPRESSED_LABEL] = layers[i].annotations.get(UNCOMPRESSED_LABEL, "")
    labels[STARGZ + "reference"] = ref
    labels[STARGZ + "digest"] = layers[i].digest
    listed = ""
    for layer in layers[i:]:
        if len(STARGZ + "layers") + len(listed + layer.digest + ",") > 4096:
            break
        listed += layer.digest + ","
    labels[STARGZ + "layers"] = listed.rstrip(",")
    return labels


def tmp_labels(labels: dict[str, str], sessions: list[str]) -> tuple[list[str], dict[str, str]]:
    """makeTmpLabelsStargzMode: (update fields, labels), every key suffixed with one new id."""
    uid = secrets.token_hex(13)
    out = {f"{k}.{uid}": v for k, v in labels.items()}
    out.update({f"{STARGZ}session.{i}.{uid}": sid for i, sid in enumerate(sessions)})
    return ["labels." + k for k in out], out


class Layer:
    """One cache record of a pulled image: a blob, its chain ID (= snapshot ID) and its descHandler's labels."""

    def __init__(self, ref: str, layers: list[Descriptor], diff_ids: list[str], i: int):
        self.desc = layers[i]
        self.snapshot_id = chain_ids(diff_ids)[i]
        self.parent_id = chain_ids(diff_ids)[i - 1] if i else ""
        self.labels = snapshot_labels(ref, layers, i)


class BuildKit:
    """BuildKit v0.11.6's containerd worker, as far as its snapshotter calls go (cache/refs.go), on
    containerd's snapshots service. `calls` records (method, key) in order; `answers` each Prepare's
    answer in prepareRemoteSnapshotsStargzMode."""

    def __init__(self, address: str, registry: Registry, repository: str):
        self.api = ContainerdAPI(address, NAMESPACE)
        self.registry = registry
        self.repository = repository
        self.sessions = [secrets.token_hex(13)]  # a build's session ID
        self.calls: list[tuple[str, str]] = []
        self.answers: dict[str, str] = {}
        lease = "buildkit-" + secrets.token_hex(6)  # a build runs under a lease (leaseutil.WithLease)
        expire = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.api.call(self.api.leases.Create,
                      leases_pb2.CreateRequest(id=lease, labels={"containerd.io/gc.expire": expire}), "lease")
        self.api.metadata.append(("containerd-lease", lease))

    def close(self) -> None:
        self.api.close()

    def _call(self, name: str, request, key: str):
        self.calls.append((name, key))
        return getattr(self.api.snapshots, name)(request, metadata=self.api.metadata, timeout=120)

    def stat(self, key: str) -> snapshots_pb2.Info | None:
        try:
            return self._call("Stat", snapshots_pb2.StatSnapshotRequest(snapshotter=PLUGIN, key=key), key).info
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None

    def update(self, info: snapshots_pb2.Info, labels: dict[str, str], fields: list[str]) -> None:
        request = snapshots_pb2.UpdateSnapshotRequest(snapshotter=PLUGIN)
        request.info.name = info.name
        request.info.labels.update(labels)
        request.update_mask.paths.extend(fields)
        self._call("Update", request, info.name)

    @contextlib.contextmanager
    def remote_labels(self, chain: list[Layer]):
        """withRemoteSnapshotLabelsStargzMode."""
        added = []
        try:
            for layer in chain:
                info = self.stat(layer.snapshot_id)
                if info is None or REMOTE_LABEL not in info.labels:
                    continue
                fields, labels = tmp_labels(inherited(layer.labels), self.sessions)
                self.update(info, labels, fields)
                added.append((info, labels, fields))
            yield
        finally:
            for info, labels, fields in reversed(added):  # Go's defers run last-in first-out
                self.update(info, {k: "" for k in labels}, fields)

    def prepare_remote(self, chain: list[Layer]) -> None:
        """prepareRemoteSnapshotsStargzMode."""
        removals = []
        try:
            for layer in chain:
                if self.stat(layer.snapshot_id) is not None:
                    continue
                labels = inherited(layer.labels)
                fields, tmp = tmp_labels(labels, self.sessions)
                labels[REF_LABEL] = layer.snapshot_id
                key = f"tmp-{secrets.token_hex(13)} {layer.snapshot_id}"
                try:
                    self._call("Prepare", snapshots_pb2.PrepareSnapshotRequest(
                        snapshotter=PLUGIN, key=key, parent=layer.parent_id, labels={**labels, **tmp}), key)
                    self.answers[layer.desc.digest] = "OK"
                except grpc.RpcError as e:
                    self.answers[layer.desc.digest] = e.code().name
                    if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                        info = self.stat(layer.snapshot_id)
                        if info is not None:
                            removals.append((info, {k: "" for k in tmp}, fields))
                            continue
                break  # this layer and those above are unlazied
        finally:
            for info, labels, fields in reversed(removals):
                self.update(info, labels, fields)

    def unlazy(self, chain: list[Layer]) -> None:
        """unlazy -> unlazyLayer: parents first, each blob fetched, applied into an extract snapshot, committed."""
        top = chain[-1]
        if self.stat(top.snapshot_id) is not None:
            return
        if len(chain) > 1:
            self.unlazy(chain[:-1])
        with tempfile.TemporaryFile() as tmp:
            self.registry.fetch_blob(self.repository, top.desc.digest, tmp)
            tmp.seek(0)
            self.api.write([tmp.read()], top.desc.size, top.desc.digest, {})
        key = f"extract-{secrets.token_hex(13)} {top.snapshot_id}"
        self._call("Prepare", snapshots_pb2.PrepareSnapshotRequest(snapshotter=PLUGIN, key=key, parent=top.parent_id),
                   key)
        mounts = self._call("Mounts", snapshots_pb2.MountsRequest(snapshotter=PLUGIN, key=key), key).mounts
        self.api.call(self.api.diff.Apply, diff_pb2.ApplyRequest(diff=descriptor(top.desc), mounts=mounts), "apply")
        self._call("Commit", snapshots_pb2.CommitSnapshotRequest(snapshotter=PLUGIN, name=top.snapshot_id, key=key),
                   top.snapshot_id)

    def extract(self, chain: list[Layer]) -> None:
        """immutableRef.Extract in stargz mode."""
        with self.remote_labels(chain):
            self.prepare_remote(chain)
            self.unlazy(chain)

    @contextlib.contextmanager
    def mounted(self, chain: list[Layer], target: str):
        """immutableRef.Mount(readonly): Extract, then View("<id>-view", id) with the tmp labels on, mounted."""
        self.extract(chain)
        key = chain[-1].snapshot_id + "-view"
        with self.remote_labels(chain):
            try:
                mounts = self._call("View", snapshots_pb2.ViewSnapshotRequest(
                    snapshotter=PLUGIN, key=key, parent=chain[-1].snapshot_id), key).mounts
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                mounts = self._call("Mounts", snapshots_pb2.MountsRequest(snapshotter=PLUGIN, key=key), key).mounts
        assert len(mounts) == 1, mounts
        m = mounts[0]
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, target], check=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", target], check=True)


def descriptor(d: Descriptor):
    from lazybuild.snapshotter.proto import descriptor_pb2

    return descriptor_pb2.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size)


# --- the services ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry with a 2-layer image as gzip (:legacy) and eStargz (:esgz), and a proxy in front of it
    that counts what the snapshotter and the download fallback read."""
    d = tmp_path_factory.mktemp("bk-images")
    reg = RegistryProcess(str(d / "registry"))
    base = {f"data/blob-{i:03d}.bin": os.urandom(64 << 10) for i in range(BASE_FILES)}
    base["etc/greeting"] = b"hello from the base layer\n"
    top = {"app/top.txt": b"hello from the top layer\n", "app/more.bin": os.urandom(256 << 10)}
    archive = docker_archive([layer_tar(str(d / "base.tar"), base), layer_tar(str(d / "top.tar"), top)],
                             str(d / "img.tar"))
    lazybuild("push", "docker-archive:" + archive, f"{reg.host}/bk/img:legacy")
    lazybuild("convert", f"{reg.host}/bk/img:legacy", f"{reg.host}/bk/img:esgz")
    proxy = FaultProxy(reg.host)
    yield proxy, base
    proxy.stop()
    reg.stop()


# Users coming from stargz-snapshotter bring its config.toml: this one is read as it is (its keys are
# aliases, tuning accepted with a warning), with one of ours beside them.
STARGZ_CONFIG = """\
background_idle_seconds = 1.0
no_background_fetch = true
allow_no_verification = false
disable_verification = false
max_concurrency = 4
[blob]
fetching_timeout_sec = 300
[directory_cache]
direct = true
[resolver]
request_timeout_sec = 20
"""


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, registry):
    d = tmp_path_factory.mktemp("bk-daemons")
    os.makedirs(d / "snapshotter")
    with open(d / "snapshotter" / "stargz-config.toml", "w") as f:
        f.write(STARGZ_CONFIG)
    sn = Snapshotter(str(d / "snapshotter"), config=str(d / "snapshotter" / "stargz-config.toml"))
    sn.start()
    os.makedirs(d / "containerd")
    ctd = Containerd(str(d / "containerd"), sn.sock, plugin=PLUGIN)
    yield sn, ctd
    ctd.stop()
    sn.stop()
    assert not lazybuild_mounts(sn.root), "the snapshotter left mounts behind"


def image(proxy: FaultProxy, tag: str) -> tuple[str, list[Descriptor], list[str]]:
    """(reference through the proxy, layers, diff_ids) of bk/img:<tag>."""
    ref = f"{proxy.host}/bk/img:{tag}"
    with Registry(proxy.host, insecure=True) as reg:
        manifest = reg.resolve(Reference.parse(ref)).manifest
        config = json.loads(reg.read_blob("bk/img", manifest.config.digest, size=manifest.config.size))
    return ref, manifest.layers, config["rootfs"]["diff_ids"]


def blob_gets(proxy: FaultProxy, digest: str, since: int = 0) -> list[str]:
    """The Range header ("" for a whole-blob GET) of each GET of blob `digest` the proxy forwarded."""
    return [headers.get("Range", "") for _, method, path, headers in proxy.requests[since:]
            if method == "GET" and path.endswith("/blobs/" + digest)]


def backend_snapshots(sn: Snapshotter) -> dict[str, snapshots_pb2.Info]:
    """Our snapshotter's own view (its socket, not containerd's), by name."""
    with grpc.insecure_channel("unix://" + sn.sock) as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        return {info.name: info for resp in stub.List(snapshots_pb2.ListSnapshotsRequest(), timeout=30)
                for info in resp.info}


def tmp_keys(labels) -> list[str]:
    """Labels BuildKit adds for one call only: `<label>.<id>` and the session labels."""
    return [k for k in labels if k.startswith(STARGZ + "session.") or
            any(k.startswith(base + ".") for base in (TOC_LABEL, STARGZ + "reference", STARGZ + "digest",
                                                     STARGZ + "layers"))]


# --- the tests ---------------------------------------------------------------------------------------------------

def test_buildkit_sequence_serves_estargz_layers_lazily(daemons, registry, tmp_path):
    sn, ctd = daemons
    proxy, base_files = registry
    ref, layers, diff_ids = image(proxy, "esgz")
    assert all(TOC_LABEL in layer.annotations for layer in layers)
    chain = [Layer(ref, layers, diff_ids, i) for i in range(len(layers))]
    sizes = {layer.digest: layer.size for layer in layers}
    start = len(proxy.requests)
    sent_before = proxy.blob_bytes_sent

    with Registry(proxy.host, insecure=True) as reg:
        bk = BuildKit(ctd.sock, reg, "bk/img")
        try:
            bk.extract(chain)
            # both layers became remote snapshots: Prepare answered AlreadyExists, nothing was downloaded
            assert bk.answers == {layer.digest: "ALREADY_EXISTS" for layer in layers}
            prepares = [key for method, key in bk.calls if method == "Prepare"]
            assert [k.split(" ")[1] for k in prepares] == [c.snapshot_id for c in chain]
            assert all(k.startswith("tmp-") for k in prepares)  # no extract-: no download, no Apply
            assert ("Commit", chain[-1].snapshot_id) not in bk.calls
            for layer in chain:
                info = bk.stat(layer.snapshot_id)
                assert REMOTE_LABEL in info.labels  # BuildKit's isLazy: the ref stays lazy
                assert not tmp_keys(info.labels), info.labels  # the tmp labels were removed again
            lazy_bytes = proxy.blob_bytes_sent - sent_before
            for layer in layers:  # only ranged reads (footer and TOC) of each blob
                gets = blob_gets(proxy, layer.digest, start)
                assert gets and all(gets), (layer.digest, gets)
            assert lazy_bytes < 0.3 * sum(sizes.values()), (lazy_bytes, sizes)
            print(f"\nlazy Prepare of {len(layers)} layers ({sum(sizes.values())} bytes): "
                  f"{len(proxy.requests) - start} requests, {lazy_bytes} bytes")

            # a Mount (View of the top layer) shows the image's files, read on demand
            with bk.mounted(chain, str(tmp_path / "view")) as root:
                with open(os.path.join(root, "etc/greeting"), "rb") as f:
                    assert f.read() == base_files["etc/greeting"]
                with open(os.path.join(root, "data/blob-007.bin"), "rb") as f:
                    assert f.read() == base_files["data/blob-007.bin"]
                with open(os.path.join(root, "app/top.txt"), "rb") as f:
                    assert f.read() == b"hello from the top layer\n"
            read_bytes = proxy.blob_bytes_sent - sent_before
            assert read_bytes < 0.5 * sum(sizes.values()), (read_bytes, sizes)
            print(f"after reading 3 files through the View: {read_bytes} bytes")
            info = bk.stat(chain[-1].snapshot_id)
            assert not tmp_keys(info.labels), info.labels
        finally:
            bk.close()

        # our snapshotter's own records: no tmp label left either, the remote marker on both layers
        backend = backend_snapshots(sn)
        for layer in chain:
            assert REMOTE_LABEL in backend[layer.snapshot_id].labels
            assert not tmp_keys(backend[layer.snapshot_id].labels), backend[layer.snapshot_id].labels

        # a second build (new session, new tmp ids): BuildKit Stats the snapshot IDs and reuses them;
        # nothing is prepared again and the registry is not asked
        again = len(proxy.requests)
        bk2 = BuildKit(ctd.sock, reg, "bk/img")
        try:
            bk2.extract(chain)
            methods = [m for m, _ in bk2.calls]
            assert "Prepare" not in methods and "Commit" not in methods, bk2.calls
            # withRemoteSnapshotLabelsStargzMode: Stat and Update(add) per layer, then the
            # prepare step's and unlazy's Stats, then Update(remove) per layer, top first
            ids = [c.snapshot_id for c in chain]
            assert bk2.calls == ([("Stat", ids[0]), ("Update", ids[0]), ("Stat", ids[1]), ("Update", ids[1])]
                                 + [("Stat", i) for i in ids] + [("Stat", ids[1])]
                                 + [("Update", ids[1]), ("Update", ids[0])]), bk2.calls
            for layer in chain:
                assert not tmp_keys(bk2.stat(layer.snapshot_id).labels)
        finally:
            bk2.close()
        assert blob_gets(proxy, layers[0].digest, again) == [] and blob_gets(proxy, layers[1].digest, again) == []
        assert set(backend_snapshots(sn)) == set(backend)


def test_buildkit_sequence_falls_back_for_a_plain_gzip_layer(daemons, registry, tmp_path):
    """An eStargz base under a plain gzip layer (an image built FROM an eStargz base, exported as gzip):
    BuildKit sends the gzip layer's Prepare with an empty toc.digest label; the snapshotter answers with
    an ordinary active snapshot (no error, as stargz-snapshotter), so BuildKit stops the remote path there
    and downloads and applies that layer itself, on top of the lazy base."""
    sn, ctd = daemons
    proxy, base_files = registry
    ref, esgz_layers, esgz_diff_ids = image(proxy, "esgz")
    _, gzip_layers, gzip_diff_ids = image(proxy, "legacy")
    layers, diff_ids = [esgz_layers[0], gzip_layers[1]], [esgz_diff_ids[0], gzip_diff_ids[1]]
    chain = [Layer(ref, layers, diff_ids, i) for i in range(2)]
    assert chain[1].labels[TOC_LABEL] == ""  # what BuildKit sends for a layer without the annotation
    start = len(proxy.requests)
    log_start = len(sn.logs())

    with Registry(proxy.host, insecure=True) as reg:
        bk = BuildKit(ctd.sock, reg, "bk/img")
        try:
            bk.extract(chain)
            base_lazy = bk.answers.get(layers[0].digest, "shared")  # the base may be there from the other test
            assert base_lazy in ("ALREADY_EXISTS", "shared"), bk.answers
            assert bk.answers[layers[1].digest] == "OK", bk.answers  # not AlreadyExists: BuildKit unlazies it
            said = sn.logs()[log_start:]
            assert f"layer {layers[1].digest} of {ref} is downloaded by containerd" in said, said
            assert "has no containerd.io/snapshot/stargz/toc.digest label" in said, said
            extract = [key for method, key in bk.calls if method == "Prepare" and key.startswith("extract-")]
            assert [k.split(" ")[1] for k in extract] == [chain[1].snapshot_id]  # only the gzip layer
            assert ("Commit", chain[1].snapshot_id) in bk.calls
            base_info, top_info = (bk.stat(c.snapshot_id) for c in chain)
            assert REMOTE_LABEL in base_info.labels and REMOTE_LABEL not in top_info.labels
            assert not tmp_keys(base_info.labels) and not tmp_keys(top_info.labels)

            # the gzip blob: downloaded whole once (the unlazy), besides at most the ranged look at its
            # tail when the base's Prepare opened the layers above it ahead
            gets = blob_gets(proxy, layers[1].digest, start)
            assert gets.count("") == 1 and len(gets) <= 2, gets
            assert all(g for g in blob_gets(proxy, layers[0].digest, start)), "the eStargz base was downloaded"

            with bk.mounted(chain, str(tmp_path / "view")) as root:
                with open(os.path.join(root, "etc/greeting"), "rb") as f:
                    assert f.read() == base_files["etc/greeting"]
                with open(os.path.join(root, "app/top.txt"), "rb") as f:
                    assert f.read() == b"hello from the top layer\n"
        finally:
            bk.close()


def test_stargz_snapshotter_config_starts_the_snapshotter(daemons, registry):
    """The daemon above runs on a stargz-snapshotter config.toml: its tuning keys are reported as without
    effect, and no_background_fetch holds (nothing is fetched after a second of quiet, which would
    otherwise start the background fetch of every layer)."""
    sn, ctd = daemons
    proxy, _ = registry
    logs = sn.logs()
    assert "stargz-config.toml" in logs
    assert "max_concurrency, blob.fetching_timeout_sec, directory_cache.direct have no effect here" in logs, logs
    ref, layers, diff_ids = image(proxy, "esgz")
    with Registry(proxy.host, insecure=True) as reg:
        bk = BuildKit(ctd.sock, reg, "bk/img")
        try:
            bk.extract([Layer(ref, layers, diff_ids, i) for i in range(len(layers))])  # (or found by Stat)
        finally:
            bk.close()
    assert {layer["digest"] for layer in sn.status()["layers"].values()} >= {layer.digest for layer in layers}
    sent = proxy.blob_bytes_sent
    time.sleep(2.5)
    assert proxy.blob_bytes_sent == sent
