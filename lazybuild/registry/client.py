"""The OCI distribution client: one `Registry` per host, every request through one httpx.Client.

`Registry` is the public face and holds no logic of its own: each method hands its work to the
module whose one job it is, all sharing one `Session` (the connection):

- `session.py`: the httpx clients, auth, and `send`, the one place requests go through (redirects
  followed and checked by us, credentials only to the registry's own origin, retries with backoff);
  `tls.py` picks the CAs and probes loopback ports for TLS;
- `manifests.py`: fetching manifests (capped, digest-checked) and resolving a reference to one
  image manifest for a platform;
- `blobs.py`: whole blobs, checked against their digest over every byte;
- `ranges.py`: byte ranges, and the fallback for a registry that ignores Range (each blob
  downloaded once, verified, and kept in a temporary file);
- `push.py`: blob uploads (cross-repository mounts, whole or chunked) and manifest pushes;
- `errors.py`, `bodies.py`: what a failure becomes, and bodies read within their caps.

Errors name the URL, the status and what to try. The names other modules import from here
(`RegistryError`, `Resolved`, `system_tls_context`, the caps and limits) stay importable from here.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterator

from ..image import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Platform
from . import blobs, manifests, push
from .auth import Credentials, RegistryAuthError, load_credentials
from .bodies import MAX_ERROR_BODY_BYTES
from .errors import RegistryError
from .manifests import Resolved
from .push import CHUNK_UPLOAD_BYTES
from .ranges import MULTIPART_SLACK_BYTES, PART_HEADER_BYTES, RangeReader
from .reference import Reference
from .session import DEFAULT_TIMEOUT_S, MAX_ATTEMPTS, MAX_REDIRECTS, REDIRECT_CODES, Session
from .tls import system_tls_context


def _session_attribute(name: str, doc: str) -> property:
    # Read and written through to the session, so that setting one here (backoff_s in a test) acts
    # on the requests as it did when the Registry held it.
    return property(lambda self: getattr(self._session, name),
                    lambda self, value: setattr(self._session, name, value), doc=doc)


class Registry:
    """One registry host: manifests, blobs (whole or by range) and pushes, over one session."""

    def __init__(self, host: str, *, insecure: bool = False, loopback: bool | None = None,
                 credentials: Credentials | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 certs_dir: str | None = None, backoff_s: float = 0.2):
        self._session = Session(host, insecure=insecure, loopback=loopback, credentials=credentials,
                                timeout_s=timeout_s, certs_dir=certs_dir, backoff_s=backoff_s)
        self._ranges = RangeReader(self._session)

    host = _session_attribute("host", "the registry as named in references (`HOST[:PORT]`)")
    base = _session_attribute("base", "the registry's API origin, `http(s)://API_HOST`")
    auth = _session_attribute("auth", "the registry's challenge and tokens (`RegistryAuth`)")
    client = _session_attribute("client", "the httpx.Client requests go through (it follows no redirects)")
    backoff_s = _session_attribute("backoff_s", "the first retry's delay; it doubles with each attempt")
    ranges_ignored = _session_attribute("ranges_ignored", "set on the first 200 answer to a Range request")

    def close(self) -> None:
        self._session.close()
        self._ranges.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Manifests

    def get_manifest(self, ref: Reference) -> tuple[bytes, str]:
        """(exact bytes, media type) of the manifest or index `ref` names; checked against a pinned digest.
        Bodies past MAX_MANIFEST_BYTES are refused before they are read whole."""
        return manifests.get_manifest(self._session, ref)

    def resolve(self, ref: Reference, platform: Platform | None = None) -> Resolved:
        """`ref` resolved to one image manifest, the platform's (the host's by default) when it names an index."""
        return manifests.resolve(self._session, ref, platform)

    def put_manifest(self, repository: str, tag_or_digest: str, raw: bytes, media_type: str) -> str:
        """Push a manifest; returns its digest."""
        return push.put_manifest(self._session, repository, tag_or_digest, raw, media_type)

    # Whole blobs

    def blob_url(self, repository: str, digest: str) -> str:
        """The blob's URL; the digest is checked before it becomes part of one."""
        return blobs.blob_url(self._session, repository, digest)

    def blob_size(self, repository: str, digest: str) -> int | None:
        """Size from HEAD, or from a 1-byte ranged GET where HEAD is refused; None when the blob is absent."""
        return blobs.blob_size(self._session, repository, digest)

    def fetch_blob(self, repository: str, digest: str, out: BinaryIO, progress: Callable[[int], None] | None = None,
                   *, size: int | None = None, cap: tuple[int, str] | None = None) -> int:
        """Download a whole blob into `out`, digest checked over every byte (see blobs.fetch_blob). Returns the size."""
        return blobs.fetch_blob(self._session, repository, digest, out, progress, size=size, cap=cap)

    def read_blob(self, repository: str, digest: str, size: int | None = None) -> bytes:
        """A small blob (a config) in memory, digest checked, at most MAX_CONFIG_BYTES (and `size`)."""
        return blobs.read_blob(self._session, repository, digest, size)

    # Ranges (the caller verifies content: a range cannot be checked against the blob digest)

    def stream_range(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes [start, end) of a blob as they arrive (one request)."""
        yield from self._ranges.stream_range(repository, digest, start, end)  # lazy, as callers expect

    def read_ranges(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each [start, end) range of a blob, in one request where the registry allows."""
        return self._ranges.read_ranges(repository, digest, ranges)

    def read_tail(self, repository: str, digest: str, length: int) -> tuple[int, bytes]:
        """(blob size, its last `length` bytes) in one request (a suffix Range)."""
        return self._ranges.read_tail(repository, digest, length)

    # Pushes

    def blob_exists(self, repository: str, digest: str) -> bool:
        return push.blob_exists(self._session, repository, digest)

    def push_blob(self, repository: str, digest: str, size: int, open_blob: Callable[[], BinaryIO],
                  mount_from: str | None = None, progress: Callable[[int], None] | None = None) -> str:
        """Upload a blob unless it is there; try a cross-repository mount first when `mount_from` is given.
        Returns "exists", "mounted" or "uploaded"."""
        return push.push_blob(self._session, repository, digest, size, open_blob, mount_from, progress)


__all__ = ["CHUNK_UPLOAD_BYTES", "DEFAULT_TIMEOUT_S", "MAX_ATTEMPTS", "MAX_CONFIG_BYTES", "MAX_ERROR_BODY_BYTES",
           "MAX_MANIFEST_BYTES", "MAX_REDIRECTS", "MULTIPART_SLACK_BYTES", "PART_HEADER_BYTES", "REDIRECT_CODES",
           "Credentials", "Reference", "Registry", "RegistryAuthError", "RegistryError", "Resolved",
           "load_credentials", "system_tls_context"]
