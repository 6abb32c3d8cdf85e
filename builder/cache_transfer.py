"""`--cache-to` / `--cache-from`: the step cache carried between machines as an OCI artifact.

The step cache (`executor.py`) keeps each finished step as `steps/<key[:32]>/upper` (the overlay upper dir:
the step's files, whiteouts as 0:0 character devices, opaque directories as `trusted.overlay.opaque`) and a
`done` marker. Exported, each step used by the build is one gzip'd tar blob (xattrs in PAX headers) whose
descriptor carries the full key; a small config lists the steps; one OCI manifest holds them — in an OCI
layout (`type=local,dest=DIR`) or pushed (`type=registry,ref=REF`). Imported before the build, every step the
state dir lacks is fetched (digest checked), unpacked by the ADD extraction's rules (nothing climbs out, no
entry under a link the archive made, no hardlink out; only overlay and capability xattrs) under a temporary
name and renamed into the step cache, so the build finds it cached and does not run it.

A cache is trusted as a build's own state is: whoever can write it decides what cached steps contain."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass

from lazybuild.errors import RemoteError, UsageError
from lazybuild.image import Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.registry import Reference
from lazybuild.transfer import OCIDest, OCISource, RegistryDest, RegistrySource, Source, TransferError

from .executor import publish_step
from .filecopy import CopyError, unpack_archive

CONFIG_MEDIA_TYPE = "application/vnd.lazybuild.stepcache.config.v1+json"
STEP_MEDIA_TYPE = "application/vnd.lazybuild.stepcache.step.v1.tar+gzip"
KEY_ANNOTATION = "dev.lazybuild.step.key"
LAYOUT_TAG = "latest"
MAX_STEP_UNPACKED = 16 << 30  # what one imported step may unpack to
XATTRS = ("trusted.overlay.opaque", "security.capability")  # what an upper dir's meaning needs, and no more
KEY_RE = re.compile(r"[0-9a-f]{64}")
REFUSED_TYPES = {"inline": "the cache in the image config needs BuildKit's cache records, which lazybuild's "
                           "step cache is not",
                 "gha": "GitHub Actions' cache service is not spoken here",
                 "s3": "S3 is not spoken here", "azblob": "Azure Blob storage is not spoken here"}


class CacheSpecError(UsageError):
    hint = ("--cache-to type=local,dest=DIR | type=registry,ref=REF; "
            "--cache-from type=local,src=DIR | type=registry,ref=REF")


@dataclass(frozen=True)
class CacheSpec:
    """One `--cache-to` or `--cache-from`: type=local with a directory, or type=registry with a reference."""

    type: str
    path: str = ""
    ref: str = ""

    @classmethod
    def parse(cls, text: str, direction: str) -> "CacheSpec":
        flag = f"--cache-{direction}"
        if "=" not in text:  # buildx: a bare value is a registry reference
            return cls("registry", ref=cls._ref(text, flag))
        values: dict[str, str] = {}
        for field in next(csv.reader([text])):
            key, eq, value = field.partition("=")
            if not eq:
                raise CacheSpecError(f"{flag} {text}: {key!r} is not KEY=VALUE")
            values[key.strip().lower()] = value.strip()
        ctype = values.get("type", "")
        if ctype in REFUSED_TYPES:
            raise CacheSpecError(f"{flag} type={ctype}: not supported by lazybuild ({REFUSED_TYPES[ctype]}); "
                                 "use type=local or type=registry")
        path_key = "dest" if direction == "to" else "src"
        known = {"local": ("type", path_key, "mode"), "registry": ("type", "ref", "mode")}
        if ctype not in known:
            raise CacheSpecError(f"{flag} {text}: type={ctype or '(missing)'}: want local or registry")
        for key in values:
            if key not in known[ctype]:
                raise CacheSpecError(f"{flag} {text}: unknown key {key} (known for type={ctype}: "
                                     f"{', '.join(known[ctype])})")
        if values.get("mode", "max") not in ("min", "max"):
            raise CacheSpecError(f"{flag} mode={values['mode']}: want min or max")
        if ctype == "local":
            if not values.get(path_key):
                raise CacheSpecError(f"{flag} {text}: type=local needs {path_key}=DIR")
            return cls("local", path=values[path_key])
        if not values.get("ref"):
            raise CacheSpecError(f"{flag} {text}: type=registry needs ref=REGISTRY/NAME:TAG")
        return cls("registry", ref=cls._ref(values["ref"], flag))

    @staticmethod
    def _ref(text: str, flag: str) -> str:
        try:
            ref = Reference.parse(text)
        except ValueError as e:
            raise CacheSpecError(f"{flag} {text}: {e}") from None
        if ref.digest:
            raise CacheSpecError(f"{flag} {text}: name the cache by a tag, not a digest")
        return str(ref)

    def __str__(self) -> str:
        return self.path if self.type == "local" else self.ref


def export_steps(keys: list[str], steps_dir: str, spec: CacheSpec, *, insecure: bool = False,
                 log=lambda s: None) -> str:
    """Write the finished steps KEYS (full keys, in build order) of STEPS_DIR where SPEC says; returns the
    artifact manifest's digest."""
    seen: set[str] = set()
    work = tempfile.mkdtemp(prefix=".cache-export-", dir=steps_dir)
    dest = OCIDest(spec.path, LAYOUT_TAG) if spec.type == "local" else RegistryDest(Reference.parse(spec.ref), insecure)
    try:
        layers: list[Descriptor] = []
        steps = []
        for key in keys:
            step_dir = os.path.join(steps_dir, key[:32])
            if key in seen or not os.path.isfile(os.path.join(step_dir, "done")):
                continue
            seen.add(key)
            blob = os.path.join(work, key)
            digest, size = _write_step(os.path.join(step_dir, "upper"), blob)
            desc = Descriptor(STEP_MEDIA_TYPE, digest, size, {KEY_ANNOTATION: key})
            dest.put_blob(desc, blob)
            layers.append(desc)
            steps.append({"key": key, "digest": digest})
        config = canonical_json({"steps": steps})
        config_desc = Descriptor(CONFIG_MEDIA_TYPE, sha256_digest(config), len(config))
        config_path = os.path.join(work, "config")
        with open(config_path, "wb") as f:
            f.write(config)
        dest.put_blob(config_desc, config_path)
        manifest = Manifest.build(config_desc, layers, {"dev.lazybuild.stepcache.created": str(int(time.time()))})
        dest.put_manifest(manifest)
        digest = dest.finish([(manifest, None)])
        log(f"cache: {len(layers)} steps exported to {spec}")
        return digest
    finally:
        dest.close()
        shutil.rmtree(work, ignore_errors=True)


def _write_step(upper: str, blob: str) -> tuple[str, int]:
    """The upper dir as a gzip'd tar (owners numeric, whiteout devices, the xattrs that matter); its digest and size."""
    h = hashlib.sha256()

    class Hashing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            h.update(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    with open(blob, "wb") as raw:
        hashing = Hashing(raw)
        with gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for dirpath, dirs, files in os.walk(upper):
                dirs.sort()
                for name in sorted(dirs) + sorted(files):
                    path = os.path.join(dirpath, name)
                    info = tf.gettarinfo(path, os.path.relpath(path, upper))
                    if info is None:  # a socket: nothing a layer keeps
                        continue
                    info.uname = info.gname = ""
                    for attr in XATTRS:
                        try:
                            value = os.getxattr(path, attr, follow_symlinks=False)
                        except OSError:
                            continue
                        info.pax_headers["SCHILY.xattr." + attr] = value.decode("latin-1")
                    if info.isreg():
                        with open(path, "rb") as f:
                            tf.addfile(info, f)
                    else:
                        tf.addfile(info)
    return "sha256:" + h.hexdigest(), os.path.getsize(blob)


def import_steps(spec: CacheSpec, steps_dir: str, *, insecure: bool = False, log=lambda s: None) -> int:
    """Bring the steps of the cache SPEC that STEPS_DIR lacks into it; returns how many."""
    if spec.type == "local" and not os.path.exists(os.path.join(spec.path, "oci-layout")):
        log(f"cache: nothing imported from {spec}: no cache there yet")  # as buildx: not an error
        return 0
    source: Source = OCISource(spec.path, LAYOUT_TAG) if spec.type == "local" else \
        RegistrySource(Reference.parse(spec.ref), insecure)
    brought = 0
    try:
        try:
            [(manifest, _)] = source.manifests(None, False)
        except RemoteError as e:  # as buildx: a cache the registry does not have (yet) is not an error
            log(f"cache: nothing imported from {spec}: {e}")
            return 0
        if manifest.config.media_type != CONFIG_MEDIA_TYPE:
            raise TransferError(f"--cache-from {spec}: not a lazybuild step cache "
                                f"(config {manifest.config.media_type})")
        for desc in manifest.layers:
            key = desc.annotations.get(KEY_ANNOTATION, "")
            if desc.media_type != STEP_MEDIA_TYPE or not KEY_RE.fullmatch(key):
                raise TransferError(f"--cache-from {spec}: layer {desc.digest} is not a step of a lazybuild cache")
            final = os.path.join(steps_dir, key[:32])
            if os.path.isfile(os.path.join(final, "done")):
                continue
            _import_step(source, desc, key, final, steps_dir, str(spec))
            brought += 1
        log(f"cache: {brought} steps imported from {spec} ({len(manifest.layers) - brought} already here)")
        return brought
    finally:
        source.close()


def _import_step(source: Source, desc: Descriptor, key: str, final: str, steps_dir: str, label: str) -> None:
    tmp = tempfile.mkdtemp(prefix="tmp-", dir=steps_dir)
    try:
        blob = os.path.join(tmp, "blob")
        with open(blob, "wb") as f:
            source.fetch(desc, f)  # digest checked over every byte
        upper = os.path.join(tmp, "upper")
        os.mkdir(upper)
        try:
            unpack_archive(blob, upper, f"{label}: step {key[:12]}", MAX_STEP_UNPACKED, xattrs=XATTRS)
        except CopyError as e:
            raise TransferError(str(e)) from None
        os.unlink(blob)
        publish_step(tmp, final, {"imported": label, "blob": desc.digest})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
