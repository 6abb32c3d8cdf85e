"""Flatten image layers (OCI layout tar or `docker save` archive) into path -> (type, mode, uid, gid, link
target, content sha256), applying whiteouts as a container runtime would: what two images' final
filesystems are compared by."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile


# eStargz keeps its TOC and landmark as tar entries; runtimes that know eStargz hide them.
ESTARGZ_METADATA = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


def _open_layer(data: bytes) -> tarfile.TarFile:
    if data[:2] == b"\x1f\x8b":  # gzip, possibly many members (eStargz): GzipFile reads them all
        data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return tarfile.open(fileobj=io.BytesIO(data))


def _clean(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    name = posixpath.normpath(name.lstrip("/")) if name.strip("./") else ""
    return "" if name == "." else name


def apply_layer(fs: dict, layer: tarfile.TarFile) -> None:
    for m in layer:
        name = _clean(m.name)
        if not name or name == "." or name in ESTARGZ_METADATA:
            continue
        base, parent = posixpath.basename(name), posixpath.dirname(name)
        if base == ".wh..wh..opq":
            for p in [p for p in fs if p.startswith(parent + "/")]:
                del fs[p]
            continue
        if base.startswith(".wh."):
            gone = posixpath.join(parent, base[4:])
            for p in [p for p in fs if p == gone or p.startswith(gone + "/")]:
                del fs[p]
            continue
        if m.islnk():
            fs[name] = fs.get(_clean(m.linkname), (b"0", "", 0, 0, "", ""))
            continue
        digest = hashlib.sha256(layer.extractfile(m).read()).hexdigest() if m.isfile() else ""
        if name in fs and fs[name][0] == tarfile.DIRTYPE and m.isdir():
            pass  # a directory over a directory merges; its own metadata is the new one
        elif name in fs and not m.isdir():
            for p in [p for p in fs if p.startswith(name + "/")]:
                del fs[p]
        fs[name] = (m.type, oct(m.mode & 0o7777), m.uid, m.gid, m.linkname, digest)  # Go tars add type bits


def flatten_oci_tar(path: str, tag: str = "") -> tuple[dict, dict]:
    """(config, filesystem) of the image in an OCI layout tar."""
    with tarfile.open(path) as outer:
        def blob(digest: str) -> bytes:
            return outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()

        index = json.loads(outer.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        fs: dict = {}
        for layer in manifest["layers"]:
            with _open_layer(blob(layer["digest"])) as tf:
                apply_layer(fs, tf)
    return config, fs


def flatten_docker_save(path: str) -> tuple[dict, dict]:
    with tarfile.open(path) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())[0]
        config = json.loads(outer.extractfile(manifest["Config"]).read())
        fs: dict = {}
        for layer in manifest["Layers"]:
            with _open_layer(outer.extractfile(layer).read()) as tf:
                apply_layer(fs, tf)
    return config, fs
