"""`--output` of `lazybuild build`, as `docker buildx build` spells it, and where each kind of output goes.

buildx's rules: a value without `=` is a path (`-o DIR` is `type=local,dest=DIR`, `-o -` is `type=tar` on
stdout); `type=oci|docker` write tarballs (`dest=FILE` or `-`) unless `tar=false`; `type=docker` without
`dest` loads the image into Docker (`--load`); `type=registry` is `type=image,push=true` (`--push`).
Every key and value is checked: a typo is an error naming the known ones, never ignored.

What differs: our layers are always eStargz, so `compression=` chooses its framing only (gzip or zstd),
and `type=stargz` (ours) is an image whose destinations are the tags (push=true) and an OCI layout (dest=).
"""

from __future__ import annotations

import abc
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from lazybuild.errors import HostError, UsageError
from lazybuild.image import Descriptor
from lazybuild.registry import Reference
from lazybuild.transfer import ArchiveDest, Dest, OCIArchiveDest, OCIDest, RegistryDest

# The keys each type takes, in the order `--help` and errors list them.
TYPE_KEYS = {
    "local": ("type", "dest"),
    "tar": ("type", "dest"),
    "oci": ("type", "dest", "name", "tar", "compression", "oci-mediatypes"),
    "docker": ("type", "dest", "name", "tar", "compression", "oci-mediatypes"),
    "image": ("type", "name", "push", "compression", "oci-mediatypes"),
    "registry": ("type", "name", "push", "compression", "oci-mediatypes"),
    "stargz": ("type", "dest", "name", "push", "tar", "compression"),
}
OUTPUT_TYPES = tuple(TYPE_KEYS)
ALL_KEYS = ("type", "dest", "name", "push", "tar", "compression", "oci-mediatypes")
# buildx's compression names -> the framing of our eStargz layers (estargz is gzip; zstd:chunked is eStargz-zstd).
COMPRESSION = {"gzip": "gzip", "estargz": "gzip", "zstd": "zstd", "zstd:chunked": "zstd"}
STDOUT = "-"
# Go's strconv.ParseBool, which buildx uses for its boolean keys.
TRUE, FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")
# The annotation buildx's OCI and Docker tarballs carry the full image name in (ref.name holds the tag only).
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"

HELP = ("PATH (a directory: type=local), - (a tar of the root filesystem on stdout), or "
        "type=local|tar,dest=PATH; type=oci|docker[,dest=FILE|-][,tar=false][,name=REF] (tarballs; type=docker "
        "without dest loads into Docker); type=image|registry[,name=REF][,push=true]; "
        "type=stargz[,dest=PATH][,push=true]; compression=gzip|estargz|zstd|zstd:chunked (layers are always "
        "eStargz: gzip and estargz are eStargz-gzip, zstd and zstd:chunked eStargz-zstd)")


class OutputError(UsageError):
    """An --output value that does not parse: usage, exit 2."""

    hint = "`lazybuild build --help` lists the output types and their keys"


@dataclass(frozen=True)
class OutputSpec:
    """One parsed `--output`. `dest` is a path, "-" for stdout, or "" (type=docker: load into Docker)."""

    type: str
    dest: str = ""
    names: tuple[str, ...] = ()
    push: bool = False
    tar: bool = True
    compression: str = "gzip"  # the eStargz framing: gzip or zstd

    @classmethod
    def parse(cls, text: str) -> "OutputSpec":
        text = text.strip()
        if not text:
            raise OutputError("--output is empty: give a PATH, - or type=...")
        if "=" not in text:  # buildx: a bare value is where the root filesystem goes
            return cls("tar", STDOUT) if text == STDOUT else cls("local", text)
        try:
            fields = next(csv.reader([text]))  # as buildx reads it: name="a,b" is one field
        except (csv.Error, StopIteration) as e:
            raise OutputError(f"--output {text}: {e}") from None
        values: dict[str, str] = {}
        for f in fields:
            key, eq, value = f.partition("=")
            key = key.strip().lower()
            if not eq:
                raise OutputError(f"--output {text}: {key!r} is not KEY=VALUE (known keys: {', '.join(ALL_KEYS)})")
            if key in values:
                raise OutputError(f"--output {text}: {key} given twice")
            values[key] = value.strip()
        otype = values.get("type", "")
        if not otype:
            raise OutputError(f"--output {text}: type= is missing (one of {', '.join(OUTPUT_TYPES)})")
        if otype not in TYPE_KEYS:
            raise OutputError(f"--output type={otype}: unknown type (known: {', '.join(OUTPUT_TYPES)})")
        known = TYPE_KEYS[otype]
        for key in values:
            if key not in known:
                what = f"{key}= does not go with type={otype}" if key in ALL_KEYS else f"unknown key {key}"
                raise OutputError(f"--output {text}: {what} (known for type={otype}: {', '.join(known)})")
        push = _bool(values, "push", otype == "registry")
        if otype == "registry" and not push:
            raise OutputError("--output type=registry,push=false: type=registry pushes; use type=image for no push")
        if not _bool(values, "oci-mediatypes", True):
            raise OutputError("--output oci-mediatypes=false: lazybuild writes OCI media types only "
                              "(the eStargz annotations need an OCI manifest)")
        compression = values.get("compression", "gzip")
        if compression not in COMPRESSION:
            raise OutputError(f"--output compression={compression}: want one of {', '.join(COMPRESSION)} "
                              "(lazybuild's layers are always eStargz; uncompressed is not one)")
        names = tuple(n.strip() for n in values.get("name", "").split(",") if n.strip())
        dest = values.get("dest", "")
        tar = _bool(values, "tar", otype != "stargz" or dest.endswith(".tar"))
        spec = cls(otype, dest, names, push, tar, COMPRESSION[compression])
        spec._check(text)
        return spec

    def _check(self, text: str) -> None:
        if self.type in ("local", "tar", "oci") and not self.dest:
            want = "DIR" if self.type == "local" else "FILE or dest=-"
            raise OutputError(f"--output {text}: type={self.type} needs dest={want}")
        if self.type == "local" and self.dest == STDOUT:
            raise OutputError(f"--output {text}: type=local writes a directory; for a tar on stdout use -o - "
                              "or type=tar,dest=-")
        if not self.tar and self.dest == STDOUT:
            raise OutputError(f"--output {text}: tar=false writes a directory, not stdout")
        if self.type == "docker" and not self.tar:
            raise OutputError(f"--output {text}: type=docker writes a docker-archive, a tar; "
                              "for a directory use type=oci,tar=false")
        if self.type == "stargz" and self.dest == STDOUT:
            raise OutputError(f"--output {text}: type=stargz writes an OCI layout; for a tar on stdout use "
                              "type=oci,dest=-")

    @property
    def is_image(self) -> bool:
        """An image (layers, config, manifest) rather than a root filesystem (type=tar|local)."""
        return self.type not in ("local", "tar")

    @property
    def to_stdout(self) -> bool:
        return self.dest == STDOUT

    @property
    def loads(self) -> bool:
        """type=docker without dest (`--load`): into the local Docker daemon."""
        return self.type == "docker" and not self.dest

    def image_names(self, tags: list[str]) -> list[str]:
        """The names the image gets: name= when given, else every -t (as buildx does)."""
        return list(self.names) or list(tags)


def _bool(values: dict[str, str], key: str, default: bool) -> bool:
    if key not in values:
        return default
    value = values[key]
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise OutputError(f"--output {key}={value}: want true or false")


def parse_outputs(outputs: list[str], push: bool, load: bool) -> OutputSpec | None:
    """The one output of `-o/--output`, `--push` (type=registry) and `--load` (type=docker into Docker).
    buildx takes several; lazybuild writes one per build, and says so."""
    specs = [OutputSpec.parse(o) for o in outputs]
    if push:
        specs.append(OutputSpec("registry", push=True))
    if load:
        specs.append(OutputSpec("docker"))
    if len(specs) > 1:
        given = [*(f"-o {o}" for o in outputs), *(["--push"] if push else []), *(["--load"] if load else [])]
        raise OutputError(f"{' and '.join(given)}: one output per build (lazybuild writes one; build again "
                          "from the step cache for another, which runs no step)")
    return specs[0] if specs else None


def image_name(name: str) -> Reference:
    try:
        return Reference.parse(name)
    except ValueError as e:
        raise OutputError(f"image name {name!r}: {e}") from None


def image_destinations(spec: OutputSpec, tags: list[str], insecure: bool = False) -> list[tuple[Dest, str]]:
    """Where an image output goes, each with what the log says once it is there. The caller closes them."""
    names = spec.image_names(tags)
    refs = [image_name(n) for n in names]
    first = refs[0] if refs else None
    out: list[tuple[Dest, str]] = []
    if spec.type in ("oci", "stargz") and spec.dest:
        tag = first.tag if first is not None and first.tag else "latest"
        full = str(first) if first is not None and spec.type == "oci" else ""
        shown = "stdout" if spec.to_stdout else spec.dest
        if spec.to_stdout:
            out.append((StdoutDest(lambda path: NamedOCIArchiveDest(path, tag, full)),
                        f"wrote an OCI tarball to {shown}"))
        elif spec.tar:
            out.append((NamedOCIArchiveDest(spec.dest, tag, full), f"wrote an OCI tarball {shown} ({tag})"))
        else:
            out.append((NamedOCIDest(spec.dest, tag, full), f"wrote OCI layout {shown} ({tag})"))
    elif spec.type == "docker":
        tag = str(first) if first is not None else ""
        if spec.loads:
            also = [str(r) for r in refs[1:]]
            shown = f" as {', '.join([tag, *also])}" if tag else ""
            out.append((DockerLoadDest(tag, also), f"loaded into Docker{shown}"))
        elif spec.to_stdout:
            out.append((StdoutDest(lambda path: ArchiveDest(path, tag)), "wrote a docker-archive to stdout"))
        else:
            out.append((ArchiveDest(spec.dest, tag), f"wrote a docker-archive {spec.dest}"))
    if spec.push:
        out += [push_destination(str(ref), insecure) for ref in refs]
    return out


def push_destination(tag: str, insecure: bool = False) -> tuple[Dest, str]:
    ref = image_name(tag)
    return RegistryDest(ref, insecure), f"pushed {ref}"


class NamedOCIDest(OCIDest):
    """An OCI layout whose index entry carries the image's full name (`io.containerd.image.name`) beside its
    tag (`org.opencontainers.image.ref.name`), as BuildKit's OCI exporter writes them."""

    def __init__(self, path: str, tag: str, full_name: str = ""):
        super().__init__(path, tag)
        self.full_name = full_name

    def finish(self, images):
        if len(images) != 1 or not self.full_name:
            return super().finish(images)
        m, p = images[0]
        desc = m.descriptor(p)
        named = Descriptor(desc.media_type, desc.digest, desc.size,
                           {**desc.annotations, IMAGE_NAME_ANNOTATION: self.full_name}, desc.platform)
        self.layout.add_to_index(named, self.tag)
        return m.digest


class NamedOCIArchiveDest(OCIArchiveDest, NamedOCIDest):
    """The same, as one tar file (OCIArchiveDest's finish tars what NamedOCIDest's finish recorded)."""

    def __init__(self, path: str, tag: str, full_name: str = ""):
        OCIArchiveDest.__init__(self, path, tag)
        self.full_name = full_name


class _FileThenDest(Dest):
    """A destination written as a file in a temporary directory (INNER makes it), then handed on by deliver()."""

    def __init__(self, make_inner, name: str):
        self.tmp = tempfile.mkdtemp(prefix="lazybuild-out-")
        self.path = os.path.join(self.tmp, name)
        self.inner: Dest = make_inner(self.path)
        self.staging_dir = self.inner.staging_dir

    def put_blob(self, desc, path):
        return self.inner.put_blob(desc, path)

    def put_blob_from(self, desc, src, progress=None):
        return self.inner.put_blob_from(desc, src, progress)

    def put_manifest(self, manifest):
        self.inner.put_manifest(manifest)

    def finish(self, images):
        digest = self.inner.finish(images)
        self.deliver(self.path)
        return digest

    @abc.abstractmethod
    def deliver(self, path: str) -> None:
        """Hand the finished file at PATH to where it goes."""

    def close(self):
        try:
            self.inner.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class StdoutDest(_FileThenDest):
    """`dest=-`: the tarball, complete, then copied to stdout (nothing half-written reaches a pipe on failure)."""

    def __init__(self, make_inner):
        super().__init__(make_inner, "image.tar")

    def deliver(self, path):
        copy_to_stdout(path)


def copy_to_stdout(path: str) -> None:
    with open(path, "rb") as f:
        shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()


class DockerLoadDest(_FileThenDest):
    """`--load` / `type=docker` without dest: a docker-archive piped into `docker load` (the daemon of
    $DOCKER_HOST, as the docker CLI chooses it). Docker's store keeps the layers but not the manifest's
    annotations: the image it holds is no longer recognizable as eStargz by a lazy puller."""

    def __init__(self, tag: str, also: list[str] = ()):
        self.also = list(also)  # a docker-archive names one image: the other names are `docker tag`s after the load
        docker = shutil.which("docker")
        if docker is None:
            raise HostError("--load (type=docker without dest) needs the docker CLI on PATH: it pipes the image "
                            "into `docker load`", hint="install docker, or write a file with -o type=docker,dest=FILE")
        self.docker = docker
        super().__init__(lambda path: ArchiveDest(path, tag), "image.tar")

    def deliver(self, path):
        with open(path, "rb") as f:
            p = subprocess.run([self.docker, "load"], stdin=f, capture_output=True, text=True)
        if p.returncode != 0:
            raise HostError(f"docker load failed: {(p.stderr or p.stdout).strip()}",
                            hint="is the Docker daemon running and reachable (DOCKER_HOST, the docker socket)? "
                                 "-o type=docker,dest=FILE writes the archive instead")
        for name in self.also:
            p = subprocess.run([self.docker, "tag", self.inner.tag, name], capture_output=True, text=True)
            if p.returncode != 0:
                raise HostError(f"docker tag {self.inner.tag} {name} failed: {(p.stderr or p.stdout).strip()}")
