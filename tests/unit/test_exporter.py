"""The one export path (`exporter/assemble.py`) without services: diffs -> eStargz layers over kept base
layers -> config -> manifest -> transfer destinations (OCI layout directory and tar; a registry faked at
its client), and what each entry point adds (BuildKit's history, `--output` destinations)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from types import SimpleNamespace

import pytest

from lazybuild.estargz import TOC_DIGEST_ANNOTATION, LayerReader
from lazybuild.image import OCI_CONFIG, OCI_LAYER_GZIP, Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.layout import OCILayout
from lazybuild.registry import Reference
from lazybuild.transfer import (OCIArchiveDest, OCIDest, OCISource, RegistryDest, RegistrySource, TransferError,
                                copy_image)
from lazybuild.exporter import buildkit, daemonless
from lazybuild.exporter.assemble import ConvertedLayer, ExportError, KeptLayer, NewLayer, export_image, image_config
from lazybuild.exporter.diff import UpperDirDiff
from lazybuild.errors import UsageError
from lazybuild.exporter.output import OutputSpec, image_destinations
from lazybuild.exporter.tree_diff import TreeDiff

EPOCH = 1700000000
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens, so no client here ever talks to a registry


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), EPOCH
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def base(tmp_path):
    """A base image in an OCI layout: one plain gzip layer (Docker media type), config with its diff_id."""
    root = str(tmp_path / "base")
    layout = OCILayout(root, create=True)
    raw_tar = _tar({"etc/os-release": b"ID=test\n", "bin/sh": b"#!shell\n"})
    blob = gzip.compress(raw_tar, mtime=0)
    layer = Descriptor(DOCKER_LAYER_GZIP, layout.put_bytes(blob), len(blob))
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                             "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw_tar)]},
                             "history": [{"created_by": "base layer"}]})
    manifest = Manifest.build(Descriptor(OCI_CONFIG, layout.put_bytes(config), len(config)), [layer])
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), "base")
    source = OCISource(root, "base")
    yield SimpleNamespace(root=root, layer=layer, diff_id=sha256_digest(raw_tar), source=source, blob=blob,
                          config=json.loads(config))
    source.close()


@pytest.fixture
def upper(tmp_path):
    """A step's overlay upper dir: a new file, a deleted one (0:0 char device), an opaque directory."""
    d = tmp_path / "upper"
    (d / "app").mkdir(parents=True)
    (d / "app" / "main.py").write_text("print('hi')\n")
    (d / "app" / "data.txt").write_text("data\n" * 100)
    os.link(d / "app" / "data.txt", d / "app" / "data-link.txt")
    (d / "etc").mkdir()
    # Whiteouts are 0:0 character devices and opaque dirs trusted.* xattrs: root makes them (the tests run as root).
    os.mknod(d / "etc" / "os-release", 0o600 | 0o020000, os.makedev(0, 0))
    (d / "var").mkdir()
    os.setxattr(d / "var", "trusted.overlay.opaque", b"y")
    return str(d)


def _layer_names(layout_root: str, desc: Descriptor) -> list[str]:
    with LayerReader.open_file(OCILayout(layout_root).blob_path(desc.digest)) as r:
        r.verify(desc.annotations[TOC_DIGEST_ANNOTATION])
        return [e.name for e in r.entries]


def _export(base, upper, **kw):
    layers = [KeptLayer(base.layer, base.diff_id, base.source),
              NewLayer(UpperDirDiff(upper), prioritized_files=("app/main.py",))]
    return export_image(layers, dict(base.config), source_date_epoch=EPOCH, **kw)


def test_kept_and_new_layers_into_a_layout(base, upper, tmp_path):
    image = _export(base, upper)
    try:
        out = str(tmp_path / "out")
        dest = OCIDest(out, "v1")
        assert image.send(dest) == image.digest
    finally:
        image.close()
    assert not os.path.exists(image.work_dir)
    layout = OCILayout(out)
    [(manifest, _)] = layout.manifests_for("v1")
    assert manifest.digest == image.digest
    kept, new = manifest.layers
    # The base layer: the same bytes under the same digest, named by its OCI media type in an OCI manifest.
    assert (kept.digest, kept.media_type) == (base.layer.digest, OCI_LAYER_GZIP)
    assert layout.read_blob(kept.digest) == base.blob
    names = _layer_names(out, new)
    assert names.index("app/main.py") < names.index(".prefetch.landmark") < names.index("app/data.txt")
    assert "etc/.wh.os-release" in names and "var/.wh..wh..opq" in names
    config = json.loads(layout.read_blob(manifest.config.digest))
    assert config["rootfs"]["diff_ids"][0] == base.diff_id and len(config["rootfs"]["diff_ids"]) == 2
    assert config["created"] == "2023-11-14T22:13:20Z" and config["config"] == {"Cmd": ["sh"]}
    assert [h.get("empty_layer", False) for h in config["history"]] == [False, False]
    # Every blob checks out against its digest: a verified copy of the layout goes through.
    assert copy_image(OCISource(out, "v1"), OCIDest(str(tmp_path / "copy"), "v1")) == image.digest
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # nothing staged is left behind


def test_same_inputs_same_image_with_source_date_epoch(base, upper):
    first, second = _export(base, upper), _export(base, upper)
    try:
        assert first.digest == second.digest and first.config == second.config
    finally:
        first.close()
        second.close()


def test_one_image_to_several_destinations(base, upper, tmp_path):
    image = _export(base, upper)
    try:
        digests = {image.send(OCIDest(str(tmp_path / "dir"), "latest"))}
        tar_dest = OCIArchiveDest(str(tmp_path / "image.tar"), "latest")
        try:
            digests.add(image.send(tar_dest))
        finally:
            tar_dest.close()
        digests.add(image.send(OCIDest(str(tmp_path / "dir"), "again")))  # the layout has the blobs: kept as they are
        summary = image.summary()
    finally:
        image.close()
    assert digests == {image.digest}
    assert [lay["base"] for lay in summary["layers"]] == [True, False]
    assert summary["containerimage.digest"] == image.digest
    assert sorted(os.listdir(tmp_path)) == ["base", "dir", "image.tar", "upper"]  # the tar's work dir is gone
    with tarfile.open(tmp_path / "image.tar") as tf:
        names = tf.getnames()
        index = json.load(tf.extractfile("index.json"))
    assert "oci-layout" in names and f"blobs/sha256/{image.digest.split(':')[1]}" in names
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"


def test_a_kept_layer_that_does_not_match_its_digest_is_not_stored(base, upper, tmp_path):
    with open(OCILayout(base.root).blob_path(base.layer.digest), "r+b") as f:
        f.seek(20)
        f.write(b"X")
    image = _export(base, upper)
    out = tmp_path / "out"
    try:
        with pytest.raises(TransferError, match="corrupt or changed"):
            image.send(OCIDest(str(out), "latest"))
    finally:
        image.close()
    assert os.listdir(out / "blobs" / "sha256") == []  # the kept layer comes first: nothing was named
    assert not [n for n in os.listdir(out) if n.startswith(".")]


class FakeRegistry:
    """The registry client's push side: records what was asked; a blob in `mountable` mounts."""

    def __init__(self, mountable=()):
        self.mountable, self.pushed, self.manifests = set(mountable), [], []

    def push_blob(self, repository, digest, size, open_blob, mount_from=None, progress=None):
        if mount_from and digest in self.mountable:
            self.pushed.append((repository, digest, f"mounted from {mount_from}"))
            return "mounted"
        with open_blob() as f:
            assert sha256_digest(f.read()) == digest
        self.pushed.append((repository, digest, "uploaded"))
        return "uploaded"

    def put_manifest(self, repository, reference, raw, media_type):
        self.manifests.append((repository, reference))
        return sha256_digest(raw)

    def close(self):
        pass


def test_a_push_mounts_kept_layers_and_never_downloads_them(base, upper):
    source = RegistrySource(Reference.parse(f"{UNREACHABLE}/library/base:1"))
    source.fetch = lambda *a, **k: pytest.fail("a kept layer was downloaded")
    layers = [KeptLayer(base.layer, base.diff_id, source), NewLayer(UpperDirDiff(upper))]
    image = export_image(layers, dict(base.config), source_date_epoch=EPOCH)
    dest = RegistryDest(Reference.parse(f"{UNREACHABLE}/built/app:2"))
    dest.registry = FakeRegistry(mountable={base.layer.digest})
    try:
        assert image.send(dest) == image.digest
    finally:
        image.close()
    assert dest.registry.pushed[0] == (
        "built/app", base.layer.digest, "mounted from library/base")
    assert [how for _, _, how in dest.registry.pushed[1:]] == ["uploaded", "uploaded"]  # the new layer, the config
    assert dest.registry.manifests[-1] == ("built/app", "2")


def test_tree_diff_writes_what_changed(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for root in (lower, upper):
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "same").write_text("same\n")
        os.utime(root / "etc" / "same", (EPOCH, EPOCH))
    (lower / "etc" / "gone").write_text("x")
    (lower / "etc" / "changed").write_text("old")
    (upper / "etc" / "changed").write_text("new")
    (upper / "new").mkdir()
    (upper / "new" / "file").write_text("f")
    for root in (lower, upper):
        os.utime(root / "etc", (EPOCH, EPOCH))
    out = str(tmp_path / "layer.tar")
    TreeDiff(str(lower), str(upper)).write_tar(out, EPOCH)
    with tarfile.open(out) as tf:
        names = tf.getnames()
        assert all(m.mtime <= EPOCH for m in tf.getmembers())
    assert "etc/.wh.gone" in names and "etc/changed" in names and "new/file" in names
    assert "etc/same" not in names
    TreeDiff(None, str(upper)).write_tar(out)
    with tarfile.open(out) as tf:
        assert "etc/same" in tf.getnames() and not any(".wh." in n for n in tf.getnames())


def test_history_has_one_entry_per_layer():
    config = {"history": [{"created_by": "a"}, {"created_by": "ENV", "empty_layer": True}, {"created_by": "b"},
                          {"created_by": "c"}]}
    fewer = json.loads(image_config(config, ["sha256:" + "1" * 64, "sha256:" + "2" * 64], EPOCH))
    assert [h.get("empty_layer", False) for h in fewer["history"]] == [False, True, False, True]
    assert all(h["created"] == "2023-11-14T22:13:20Z" for h in fewer["history"])
    more = json.loads(image_config({"history": []}, ["sha256:" + "1" * 64]))
    assert more["history"][0]["comment"] == "lazybuild.exporter" and more["created"].endswith("Z")


def _settings(**kw) -> buildkit.ExportSettings:
    history = [{"created_by": "base 1"}, {"created_by": "base env", "empty_layer": True},
               {"created_by": "RUN x", "comment": buildkit.DOCKERFILE_COMMENT}]
    return buildkit.ExportSettings(state_count=2, base_empty=False, config={"history": history}, **kw)


def test_buildkit_history_follows_the_base_kept_converted_or_scratch():
    kept = buildkit.history(_settings(base_repository="127.0.0.1:5000/base", base_digest="sha256:" + "1" * 64))
    assert [h["created_by"] for h in kept] == ["base 1", "base env", "RUN x"]
    converted = buildkit.history(_settings())
    assert [(h["created_by"], h.get("empty_layer", False)) for h in converted] == [
        ("base 1", True), ("base env", True), ("lazybuild: the base image as one eStargz layer", False), ("RUN x", False)]
    scratch = buildkit.history(buildkit.ExportSettings(1, True, {"history": [
        {"created_by": "COPY a /", "comment": buildkit.DOCKERFILE_COMMENT}]}))
    assert [h["created_by"] for h in scratch] == ["COPY a /"]


def test_buildkit_export_step_converts_the_base_into_one_layer(tmp_path):
    states = tmp_path / "states"
    (states / "0" / "etc").mkdir(parents=True)
    (states / "0" / "etc" / "os-release").write_text("ID=test\n")
    (states / "1" / "etc").mkdir(parents=True)
    (states / "1" / "app").mkdir()
    (states / "1" / "app" / "hi").write_text("hi\n")
    meta = tmp_path / "export.json"
    meta.write_text(json.dumps({"states": 2, "baseEmpty": False, "compression": "zstd", "tag": "latest",
                                "sourceDateEpoch": EPOCH, "config": {"config": {"Cmd": ["cat", "/app/hi"]},
                                                                     "history": [{"created_by": "RUN x",
                                                                                  "comment": buildkit.DOCKERFILE_COMMENT}]}}))
    out = tmp_path / "out"
    out.mkdir()
    assert buildkit.main(["--states", str(states), "--meta", str(meta), "--out", str(out)]) == 0
    [(manifest, _)] = OCILayout(str(out)).manifests_for("latest")
    assert [d.media_type for d in manifest.layers] == ["application/vnd.oci.image.layer.v1.tar+zstd"] * 2
    assert "etc/.wh.os-release" in _layer_names(str(out), manifest.layers[1])
    assert sorted(os.listdir(out)) == ["blobs", "index.json", "oci-layout"]


def test_daemonless_result_keeps_base_layers_by_reference(base, upper):
    base_image = SimpleNamespace(ref=Reference.parse(f"{UNREACHABLE}/library/base:1"),
                                 manifest=SimpleNamespace(layers=[base.layer]), diff_ids=[base.diff_id])
    result = SimpleNamespace(config=dict(base.config), target=SimpleNamespace(layers=[
        SimpleNamespace(path="", image=base_image, index=0), SimpleNamespace(path=upper, image=None, index=0)]))
    image = daemonless.build_image(result, "gzip", prioritized={1: ["app/data.txt"]}, source_date_epoch=EPOCH)
    try:
        kept, new = image.layers
        assert kept.kept and kept.descriptor.digest == base.layer.digest and isinstance(kept.source, RegistrySource)
        assert kept.source.ref.repository == "library/base" and not new.kept
    finally:
        image.close()
    base_image.diff_ids = []
    with pytest.raises(ExportError, match="0 diff_ids for 1 layers"):
        daemonless.build_image(result)


def test_output_spec_and_where_images_go(tmp_path):
    assert OutputSpec.parse("type=stargz,compression=zstd,push=true").push
    with pytest.raises(UsageError, match="needs dest"):
        OutputSpec.parse("type=oci")
    with pytest.raises(UsageError, match="push= does not go with type=oci"):
        OutputSpec.parse("type=oci,dest=x,push=true")
    spec = OutputSpec.parse(f"type=oci,dest={tmp_path / 'image.tar'}")
    dests = image_destinations(spec, ["127.0.0.1:5000/app:v2"])
    try:
        [(dest, done)] = dests
        assert isinstance(dest, OCIArchiveDest) and dest.tag == "v2" and done.startswith("wrote an OCI tarball")
    finally:
        for dest, _ in dests:
            dest.close()
    assert os.listdir(tmp_path) == []
    assert not OutputSpec.parse("type=local,dest=x").is_image


def test_buildkit_settings_read_base_convert(tmp_path):
    meta = {"states": 2, "baseEmpty": False, "config": {},
            "base": {"repository": "127.0.0.1:5000/base", "digest": "sha256:" + "1" * 64, "platform": "linux/amd64"}}
    path = tmp_path / "export.json"
    for convert, want in ((None, True), (True, True), (False, False)):
        if convert is not None:
            meta["base"]["convert"] = convert
        path.write_text(json.dumps(meta))
        settings = buildkit.ExportSettings.load(str(path))
        assert settings.base_convert is want and settings.base_repository == "127.0.0.1:5000/base"


def test_buildkit_base_layers_are_kept_when_estargz_else_converted(base):
    estargz = Descriptor(OCI_LAYER_GZIP, "sha256:" + "2" * 64, 10, annotations={TOC_DIGEST_ANNOTATION: "sha256:" + "3" * 64})
    layers, diff_ids = [base.layer, estargz], [base.diff_id, "sha256:" + "4" * 64]
    converted, kept = buildkit.keep_or_convert(layers, diff_ids, base.source, convert=True)
    assert isinstance(converted, ConvertedLayer) and converted.descriptor == base.layer
    assert isinstance(kept, KeptLayer) and (kept.descriptor, kept.diff_id) == (estargz, diff_ids[1])
    assert all(isinstance(lay, KeptLayer) for lay in buildkit.keep_or_convert(layers, diff_ids, base.source, convert=False))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_converted_base_layer_is_estargz_with_its_own_diff_id(base, upper, tmp_path, compression):
    layers = [ConvertedLayer(base.layer, base.source), NewLayer(UpperDirDiff(upper))]
    image = export_image(layers, dict(base.config), compression=compression, source_date_epoch=EPOCH)
    out = str(tmp_path / "out")
    try:
        image.send(OCIDest(out, "latest"))
    finally:
        image.close()
    [(manifest, _)] = OCILayout(out).manifests_for("latest")
    converted = manifest.layers[0]
    assert converted.media_type == f"application/vnd.oci.image.layer.v1.tar+{compression}"
    assert converted.digest != base.layer.digest
    names = _layer_names(out, converted)  # verified against its TOC digest
    assert {"etc/os-release", "bin/sh"} <= set(names)
    # eStargz adds the TOC and a landmark to the tar: the diff_id is that of what was written.
    blob = OCILayout(out).read_blob(converted.digest, 1 << 20, "layers")
    if compression == "gzip":
        raw = gzip.decompress(blob)
    else:
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    config = json.loads(OCILayout(out).read_blob(manifest.config.digest))
    assert config["rootfs"]["diff_ids"][0] == sha256_digest(raw) != base.diff_id
    assert [h["created_by"] for h in config["history"]][:1] == ["base layer"]


def test_a_base_layer_that_does_not_match_its_digest_is_not_converted(base, upper, tmp_path):
    with open(OCILayout(base.root).blob_path(base.layer.digest), "r+b") as f:
        f.seek(20)
        f.write(b"X")
    with pytest.raises(TransferError, match="corrupt or changed"):
        export_image([ConvertedLayer(base.layer, base.source)], dict(base.config), work_parent=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["base", "upper"]  # the work dir and what was fetched are gone


def test_buildkit_export_step_says_a_private_base_needs_credentials():
    from lazybuild.registry import RegistryAuthError, RegistryError

    err = buildkit.base_needs_credentials(Reference.parse("127.0.0.1:5000/private/base@sha256:" + "1" * 64),
                                          RegistryAuthError("127.0.0.1:5000 wants a username and password"))
    assert "asks for credentials" in str(err) and "LAZYBUILD_CONVERT_BASE=0 does not help" in str(err)
    assert "docker pull 127.0.0.1:5000/private/base" in err.hint and "lazybuild build" in err.hint
    # The registry client wraps a challenge it cannot meet in a RegistryError, which keeps it as its context.
    try:
        try:
            raise RegistryAuthError("127.0.0.1:5000 wants a username and password")
        except RegistryAuthError as e:
            raise RegistryError(f"manifest of x: {e}") from None
    except RegistryError as e:
        wrapped = e
    assert buildkit.asks_for_credentials(wrapped) and buildkit.asks_for_credentials(RegistryError("denied", 403))
    assert not buildkit.asks_for_credentials(RegistryError("manifest unknown", 404))


def test_buildkit_history_of_a_base_buildkit_built_made_one_layer():
    """A base BuildKit built carries BuildKit's comment too: the Dockerfile's entries are told apart by count."""
    run = {"comment": buildkit.DOCKERFILE_COMMENT}
    history = [{"created_by": "Imported from -"}, dict(run, created_by="RUN base"), dict(run, created_by="ENV A=1", empty_layer=True),
               dict(run, created_by="RUN x")]
    entries = buildkit.history(buildkit.ExportSettings(2, False, {"history": history}))
    assert [(h["created_by"], h.get("empty_layer", False)) for h in entries] == [
        ("Imported from -", True), ("RUN base", True), ("ENV A=1", True),
        ("lazybuild: the base image as one eStargz layer", False), ("RUN x", False)]
    kept = buildkit.history(buildkit.ExportSettings(2, False, {"history": history}, base_repository="r/base",
                                                    base_digest="sha256:" + "1" * 64))
    assert kept == history


def test_a_converted_base_layer_is_led_by_its_prioritized_files(tmp_path):
    layout = OCILayout(str(tmp_path / "base"), create=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # the parent directories too: a real layer has them
        for name, data in (("etc", None), ("etc/os-release", b"ID=test\n"), ("bin", None), ("bin/sh", b"#!shell\n")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    blob = gzip.compress(buf.getvalue())
    layer = Descriptor(DOCKER_LAYER_GZIP, layout.put_bytes(blob), len(blob))
    source = OCISource(str(tmp_path / "base"), "")
    image = export_image([ConvertedLayer(layer, source, prioritized_files=("bin/sh", "not/here"))], {})
    try:
        with LayerReader.open_file(image.layers[0].blob_path) as r:
            names = [e.name for e in r.entries]
    finally:
        image.close()
    assert names.index("bin/sh") < names.index(".prefetch.landmark") < names.index("etc/os-release")
