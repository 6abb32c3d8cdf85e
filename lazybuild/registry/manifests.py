"""Reading manifests: one manifest or index by tag or digest (capped, checked against the digest asked
for and the one the registry claims), and a reference resolved to one image manifest, choosing the
platform's entry when it names an index. Pushing a manifest is in push.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from ..digest import InvalidDigest, check_digest
from ..image import (ACCEPT_MANIFESTS, INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_BYTES, Index, Manifest, Platform,
                     parse_manifest_or_index, sha256_digest)
from .errors import RegistryError, read_body, status_error
from .reference import Reference
from .session import MAX_ATTEMPTS, Session


@dataclass
class Resolved:
    """A reference resolved to one image manifest (and the index it was chosen from, if any)."""

    reference: Reference
    manifest: Manifest
    index: Index | None = None


def get_manifest(session: Session, ref: Reference) -> tuple[bytes, str]:
    """(exact bytes, media type) of the manifest or index `ref` names; checked against a pinned digest.
    Bodies past MAX_MANIFEST_BYTES are refused before they are read whole."""
    url = f"/v2/{ref.repository}/manifests/{ref.object}"
    what = f"manifest of {ref}"
    for attempt in range(MAX_ATTEMPTS):
        r = session.send("GET", url, scope=f"repository:{ref.repository}:pull", what=what,
                         headers={"Accept": ACCEPT_MANIFESTS})
        if r.status_code != 200:
            raise status_error(r, what)
        try:
            raw = read_body(r, MAX_MANIFEST_BYTES, what, "manifests")
            break
        except httpx.TransportError as e:  # dropped mid-body: ask again, as a dropped request is
            if attempt + 1 == MAX_ATTEMPTS:
                raise RegistryError(f"{what}: {r.request.url} kept dropping the connection ({e}); "
                                    "try again later", None, str(r.request.url)) from None
            time.sleep(session.backoff_s * 2**attempt)
    got = sha256_digest(raw)
    media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
    if ref.digest and got != ref.digest:
        raise RegistryError(f"{what}: {r.request.url} returned bytes with digest {got}, "
                            "not the one asked for (a broken or hostile registry)", 200, str(r.request.url))
    claimed = r.headers.get("Docker-Content-Digest")
    if claimed is not None:
        try:
            check_digest(claimed.strip(), f"{what}: the Docker-Content-Digest header of {r.request.url}")
        except InvalidDigest as e:
            raise RegistryError(str(e), 200, str(r.request.url)) from None
        # Only for the types we read: a schema1 manifest's header digest is of its unsigned payload.
        if claimed.strip() != got and media_type in MANIFEST_TYPES + INDEX_TYPES:
            raise RegistryError(f"{what}: {r.request.url} says its digest is {claimed.strip()} but its bytes "
                                f"hash to {got} (a broken or hostile registry)", 200, str(r.request.url))
    return raw, media_type


def resolve(session: Session, ref: Reference, platform: Platform | None = None) -> Resolved:
    raw, media_type = get_manifest(session, ref)
    try:
        doc = parse_manifest_or_index(raw, media_type)
    except ValueError as e:
        raise RegistryError(f"manifest of {ref}: {e}") from None
    if isinstance(doc, Manifest):
        return Resolved(ref.with_digest(doc.digest), doc)
    try:
        chosen = doc.select(platform or Platform.host())
    except LookupError as e:
        raise RegistryError(f"{ref}: {e}") from None
    raw, media_type = get_manifest(session, ref.with_digest(chosen.digest))
    try:
        return Resolved(ref.with_digest(chosen.digest), Manifest.parse(raw, media_type or chosen.media_type), doc)
    except ValueError as e:
        raise RegistryError(f"manifest {chosen.digest} of {ref}: {e}") from None
