"""Build profiles: which files of a base image a build read, per layer in first-read order, keyed by the
base image's manifest digest; kept in the state dir and, optionally, in the registry beside the base.

A later build of anything on that base (on any machine) prefetches those files' chunks in a few merged
Range requests before its first RUN, instead of one round trip per file (the mounter's FilePrefetch).

- The model: `Profile` (`parse` validates every field: a profile from a registry is hostile input;
  `merged` appends newly read files, never past the caps).
- Local: `ProfileStore(state_dir)`: `<state-dir>/profiles/sha256-<hex>.json`, written under a
  temporary name and renamed; the digest is checked before it names a file.
- Registry: `push_profile` puts an OCI artifact (artifactType `application/vnd.lazybuild.profile.v1+json`,
  the empty config, one layer holding the profile JSON, `subject` = the base manifest) under the tag
  `sha256-<hex>.lzprofile` (cosign's scheme for registries without the referrers API; a registry that has
  it indexes the subject too). `find_profile` asks the referrers API first and falls back to that tag
  when the API answers 404.

Named profiles.py, not profile.py: the standard library has a `profile`.
Paths in a profile are names inside a layer's TOC: they are only ever looked up there, never joined
onto a host path. Core module: it imports lazybuild's core only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from .digest import InvalidDigest, check_digest, digest_hex, sha256_digest
from .errors import DataError
from .image import OCI_INDEX, OCI_MANIFEST, MAX_MANIFEST_BYTES
from .registry import Reference, Registry, RegistryError

MEDIA_TYPE = "application/vnd.lazybuild.profile.v1+json"  # the profile blob, and the artifact's type
ARTIFACT_TYPE = MEDIA_TYPE
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"  # OCI 1.1's empty config for artifacts
EMPTY_JSON = b"{}"
TAG_SUFFIX = ".lzprofile"

MAX_PROFILE_BYTES = 1 << 20  # a profile's JSON, stored or fetched
MAX_FILES = 20_000  # files across all layers
MAX_LAYERS = 256
MAX_PATH_BYTES = 4096
MAX_REFERRERS_BYTES = 1 << 20  # a referrers index answer
MAX_REFERRERS = 100  # profile referrers looked at

_FILE_NAME = re.compile(r"sha256-([0-9a-f]{64})\.json")
_FIELDS = {"schemaVersion", "mediaType", "base", "layers"}


class ProfileError(DataError):
    """A profile (from the state dir or a registry) that is not what a profile must be."""

    hint = ("the profile named above is damaged or hostile and is not used; the build records a new one "
            "(`lazybuild profile rm DIGEST` deletes a local one, `--profile off` builds without any)")


def profile_tag(base: str) -> str:
    """The tag a profile of `base` is pushed under: `sha256-<hex>.lzprofile`."""
    return f"sha256-{digest_hex(base)}{TAG_SUFFIX}"


def check_path(path: object, what: str) -> str:
    """A file name as a layer's TOC has it normalized: relative, no empty, `.` or `..` parts, no NUL."""
    if not isinstance(path, str):
        raise ProfileError(f"{what}: a file name is a {type(path).__name__}, not a string")
    try:
        size = len(path.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise ProfileError(f"{what}: file name {path[:100]!r} is not valid text") from None
    if not 0 < size <= MAX_PATH_BYTES:
        raise ProfileError(f"{what}: a file name of {size} bytes (1 to {MAX_PATH_BYTES})")
    if "\0" in path or path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise ProfileError(f"{what}: file name {path[:100]!r} is not a normalized name inside a layer "
                           "(no leading /, no empty, . or .. parts)")
    return path


def _digest(value: object, what: str) -> str:
    try:
        return check_digest(value, what)
    except InvalidDigest as e:
        raise ProfileError(str(e)) from None


@dataclass
class Profile:
    """The files a build read from the base `base` (a manifest digest): per layer digest, in first-read order."""

    base: str
    layers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def file_count(self) -> int:
        return sum(len(files) for files in self.layers.values())

    def to_json(self) -> dict:
        return {"schemaVersion": 1, "mediaType": MEDIA_TYPE, "base": self.base,
                "layers": [{"digest": d, "files": list(files)} for d, files in self.layers.items()]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def parse(cls, data: object, what: str = "profile") -> "Profile":
        """The profile in DATA (bytes), every field checked; ProfileError for anything else."""
        if not isinstance(data, (bytes, bytearray)):
            raise ProfileError(f"{what}: not bytes")
        if len(data) > MAX_PROFILE_BYTES:
            raise ProfileError(f"{what}: {len(data)} bytes, over the {MAX_PROFILE_BYTES} byte cap for profiles")
        try:
            doc = json.loads(bytes(data))
        except (ValueError, RecursionError) as e:
            raise ProfileError(f"{what}: not JSON ({str(e)[:200]})") from None
        if not isinstance(doc, dict):
            raise ProfileError(f"{what}: not a JSON object")
        unknown = set(doc) - _FIELDS
        if unknown:
            raise ProfileError(f"{what}: unknown fields {sorted(unknown)[:5]!r}")
        if type(doc.get("schemaVersion")) is not int or doc["schemaVersion"] != 1:
            raise ProfileError(f"{what}: schemaVersion is {str(doc.get('schemaVersion'))[:50]!r}, not 1")
        if doc.get("mediaType") != MEDIA_TYPE:
            raise ProfileError(f"{what}: mediaType is {str(doc.get('mediaType'))[:100]!r}, not {MEDIA_TYPE}")
        base = _digest(doc.get("base"), f"{what}: base")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ProfileError(f"{what}: layers is not a list")
        if len(layers) > MAX_LAYERS:
            raise ProfileError(f"{what}: {len(layers)} layers, over the cap of {MAX_LAYERS}")
        out: dict[str, list[str]] = {}
        total = 0
        for i, layer in enumerate(layers):
            where = f"{what}: layer {i}"
            if not isinstance(layer, dict) or set(layer) != {"digest", "files"}:
                raise ProfileError(f"{where}: not an object with exactly digest and files")
            digest = _digest(layer["digest"], f"{where}: digest")
            if digest in out:
                raise ProfileError(f"{where}: layer {digest} is listed twice")
            files = layer["files"]
            if not isinstance(files, list):
                raise ProfileError(f"{where}: files is not a list")
            total += len(files)
            if total > MAX_FILES:
                raise ProfileError(f"{what}: more than the cap of {MAX_FILES} files")
            checked = [check_path(p, where) for p in files]
            if len(set(checked)) != len(checked):
                raise ProfileError(f"{where}: a file is listed twice")
            out[digest] = checked
        return cls(base, out)

    def merged(self, reads: Iterable[tuple[str, str]]) -> "Profile":
        """This profile with the (layer digest, path) READS it lacks appended in order, up to MAX_FILES
        files and MAX_PROFILE_BYTES bytes: a profile never grows past its caps. Reads whose digest or
        path is not well formed are skipped."""
        layers = {d: list(files) for d, files in self.layers.items()}
        seen = {(d, p) for d, files in layers.items() for p in files}
        count = sum(len(f) for f in layers.values())
        size = len(self.to_bytes())
        budget = MAX_PROFILE_BYTES - 1024  # room for the JSON around each new layer's list
        for digest, path in reads:
            if (digest, path) in seen:
                continue
            try:
                _digest(digest, "read")
                check_path(path, "read")
            except ProfileError:
                continue
            cost = len(json.dumps(path)) + 1 + (0 if digest in layers else len(digest) + 32)
            if count + 1 > MAX_FILES or size + cost > budget or (digest not in layers and len(layers) >= MAX_LAYERS):
                break
            layers.setdefault(digest, []).append(path)
            seen.add((digest, path))
            count += 1
            size += cost
        return Profile(self.base, layers)


# --- the local store -------------------------------------------------------------------------------------------

@dataclass
class StoredProfile:
    base: str
    path: str
    size: int
    profile: Profile | None  # None: the file does not parse (error says why)
    error: str = ""


class ProfileStore:
    """Profiles in `<state-dir>/profiles/`, one file per base manifest digest."""

    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "profiles")

    def path(self, base: str) -> str:
        """The file of `base`'s profile; InvalidDigest (an InputError) unless `base` is a sha256 digest."""
        return os.path.join(self.dir, f"sha256-{digest_hex(base)}.json")

    def load(self, base: str) -> Profile | None:
        """The profile of `base`, None when there is none; ProfileError when the file is not a valid one."""
        path = self.path(base)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PROFILE_BYTES + 1)
        except FileNotFoundError:
            return None
        profile = Profile.parse(data, f"profile {path}")
        if profile.base != base:
            raise ProfileError(f"profile {path} is of base {profile.base}, not {base}")
        return profile

    def save(self, profile: Profile) -> str:
        """Write the profile (under a temporary name, then renamed); returns its path."""
        data = profile.to_bytes()
        if len(data) > MAX_PROFILE_BYTES:  # merged() keeps inside; a caller's hand-made one may not
            raise ProfileError(f"profile of {profile.base}: {len(data)} bytes, over the cap of {MAX_PROFILE_BYTES}")
        path = self.path(profile.base)
        os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def remove(self, base: str) -> bool:
        try:
            os.unlink(self.path(base))
            return True
        except FileNotFoundError:
            return False

    def list(self) -> list[StoredProfile]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _FILE_NAME.fullmatch(name)
            if not m:
                continue
            base, path = "sha256:" + m.group(1), os.path.join(self.dir, name)
            try:
                size = os.path.getsize(path)
            except OSError:
                continue  # removed meanwhile
            try:
                out.append(StoredProfile(base, path, size, self.load(base)))
            except (ProfileError, OSError) as e:
                out.append(StoredProfile(base, path, size, None, str(e)))
        return out


# --- the registry ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """The base manifest a profile is about, as the artifact's `subject` descriptor names it."""

    media_type: str
    digest: str
    size: int


def artifact_manifest(profile: Profile, subject: Subject) -> bytes:
    blob = profile.to_bytes()
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON),
                      "data": base64.b64encode(EMPTY_JSON).decode()},
           "layers": [{"mediaType": MEDIA_TYPE, "digest": sha256_digest(blob), "size": len(blob)}],
           "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}}
    return json.dumps(doc, separators=(",", ":")).encode()


def push_profile(registry: Registry, repository: str, profile: Profile, subject: Subject) -> str:
    """Push PROFILE beside its base in REPOSITORY (blobs, then the artifact manifest under the fallback
    tag); returns the artifact manifest's digest."""
    if subject.digest != profile.base:
        raise ProfileError(f"profile of {profile.base} cannot be pushed as a profile of {subject.digest}")
    blob = profile.to_bytes()
    for data in (EMPTY_JSON, blob):
        registry.push_blob(repository, sha256_digest(data), len(data), lambda data=data: io.BytesIO(data))
    return registry.put_manifest(repository, profile_tag(profile.base), artifact_manifest(profile, subject),
                                 OCI_MANIFEST)


def _artifact_blob(doc: object, base: str, what: str) -> tuple[str, int]:
    """The (digest, size) of the profile blob an artifact manifest names, every field checked."""
    if not isinstance(doc, dict):
        raise ProfileError(f"{what}: not a JSON object")
    if doc.get("schemaVersion") != 2 or type(doc.get("schemaVersion")) is not int:
        raise ProfileError(f"{what}: schemaVersion is not 2")
    if doc.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        raise ProfileError(f"{what}: media type {str(doc.get('mediaType'))[:100]!r} is not an OCI manifest")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise ProfileError(f"{what}: artifactType {str(doc.get('artifactType'))[:100]!r} is not {ARTIFACT_TYPE}")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != base:
        raise ProfileError(f"{what}: its subject is not the base manifest {base}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise ProfileError(f"{what}: not exactly one layer")
    layer = layers[0]
    if layer.get("mediaType") != MEDIA_TYPE:
        raise ProfileError(f"{what}: its layer's media type {str(layer.get('mediaType'))[:100]!r} is not {MEDIA_TYPE}")
    digest = _digest(layer.get("digest"), f"{what}: layer digest")
    size = layer.get("size")
    if type(size) is not int or not 0 < size <= MAX_PROFILE_BYTES:
        raise ProfileError(f"{what}: its profile blob's size {str(size)[:50]} is not 1 to {MAX_PROFILE_BYTES} bytes")
    return digest, size


def _referrers(registry: Registry, repository: str, base: str) -> list[str] | None:
    """The digests of the profile artifacts the referrers API lists for BASE; None when the registry
    has no referrers API (404, or 405/501 from registries that route the path but do not implement it)."""
    from .registry.bodies import discard
    from .registry.errors import read_body, status_error

    # The facade has no referrers call; this is the one request it lacks, sent through its session (auth,
    # redirects, retries) and read within a cap like every body.
    session = registry._session
    url = f"/v2/{repository}/referrers/{base}"
    what = f"referrers of {registry.host}/{repository}@{base}"
    r = session.send("GET", url, scope=f"repository:{repository}:pull", what=what,
                     params={"artifactType": ARTIFACT_TYPE}, headers={"Accept": OCI_INDEX})
    if r.status_code in (404, 405, 501):
        discard(r)
        return None
    if r.status_code != 200:
        raise status_error(r, what)
    raw = read_body(r, MAX_REFERRERS_BYTES, what, "referrers indexes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProfileError(f"{what}: the answer is not JSON") from None
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise ProfileError(f"{what}: the answer is not an index with a manifests list")
    out = []
    for m in manifests[:MAX_REFERRERS]:
        if isinstance(m, dict) and m.get("artifactType") == ARTIFACT_TYPE:  # the filter may be ignored
            out.append(_digest(m.get("digest"), f"{what}: a referrer's digest"))
    return out


def find_profile(registry: Registry, repository: str, base: str) -> tuple[Profile, str] | None:
    """The profile of BASE pushed beside it in REPOSITORY, and where it was found; None when there is
    none. ProfileError for a profile that is not valid (hostile input), RegistryError for a failed request."""
    check_digest(base, "base manifest digest")
    found = _referrers(registry, repository, base)
    refs = [Reference(registry.host, repository, "", d) for d in (found or [])]
    if not refs:  # no referrers API (or nothing listed): the tag fallback
        refs = [Reference(registry.host, repository, profile_tag(base))]
    for ref in refs:
        try:
            raw, _ = registry.get_manifest(ref)
        except RegistryError as e:
            if e.status == 404:  # no such tag (or a referrer deleted meanwhile)
                continue
            raise
        what = f"profile manifest {ref}"
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ProfileError(f"{what}: over the manifest cap")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise ProfileError(f"{what}: not JSON") from None
        digest, size = _artifact_blob(doc, base, what)
        data = registry.read_blob(repository, digest, size=size)
        profile = Profile.parse(data, f"profile {digest} in {registry.host}/{repository}")
        if profile.base != base:
            raise ProfileError(f"profile {digest} in {registry.host}/{repository} is of base {profile.base}, "
                               f"not {base}")
        return profile, str(ref)
    return None
