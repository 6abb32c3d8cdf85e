"""Pushing: a blob (skipped when the repository has it, mounted from another repository of the same
registry when asked, else uploaded whole or in PATCH chunks), and a manifest.

Upload URLs come from the registry (Location headers); they are checked like redirects, and get
credentials only on the registry's own origin (Session.send decides).
"""

from __future__ import annotations

from typing import BinaryIO, Callable

import httpx

from ..image import sha256_digest
from .blobs import blob_url
from .bodies import discard
from .errors import RegistryError, status_error
from .session import Session

CHUNK_UPLOAD_BYTES = 16 << 20  # uploads larger than this go in PATCH chunks


def blob_exists(session: Session, repository: str, digest: str) -> bool:
    r = session.send("HEAD", blob_url(session, repository, digest), scope=f"repository:{repository}:pull,push",
                     what=f"blob {digest}")
    discard(r)
    return r.status_code == 200


def push_blob(session: Session, repository: str, digest: str, size: int, open_blob: Callable[[], BinaryIO],
              mount_from: str | None = None, progress: Callable[[int], None] | None = None) -> str:
    """Upload a blob unless it is there; try a cross-repository mount first when `mount_from` is given.
    Returns "exists", "mounted" or "uploaded"."""
    scope = f"repository:{repository}:pull,push" + (f" repository:{mount_from}:pull" if mount_from else "")
    if blob_exists(session, repository, digest):
        return "exists"
    what = f"upload of blob {digest} to {repository}"
    params = {"mount": digest, "from": mount_from} if mount_from else None
    r = session.send("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, what=what, params=params, content=b"")
    if r.status_code == 201 and mount_from:
        discard(r)
        return "mounted"
    if r.status_code != 202:
        raise status_error(r, what)
    discard(r)
    location = _location(session, r, what)
    if size <= CHUNK_UPLOAD_BYTES:
        with open_blob() as f:
            data = f.read()
        r = session.send("PUT", _with_query(location, digest=digest), scope=scope, what=what, content=data,
                         headers={"Content-Type": "application/octet-stream"})
        if progress:
            progress(len(data))
    else:
        with open_blob() as f:
            offset = 0
            while True:
                data = f.read(CHUNK_UPLOAD_BYTES)
                if not data:
                    break
                r = session.send("PATCH", location, scope=scope, what=what, content=data, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(data) - 1}"})
                if r.status_code != 202:
                    raise status_error(r, what)
                discard(r)
                location = _location(session, r, what)
                offset += len(data)
                if progress:
                    progress(len(data))
        r = session.send("PUT", _with_query(location, digest=digest), scope=scope, what=what, content=b"")
    if r.status_code != 201:
        raise status_error(r, what)
    discard(r)
    return "uploaded"


def put_manifest(session: Session, repository: str, tag_or_digest: str, raw: bytes, media_type: str) -> str:
    url = f"/v2/{repository}/manifests/{tag_or_digest}"
    what = f"push manifest {repository}:{tag_or_digest}"
    r = session.send("PUT", url, scope=f"repository:{repository}:pull,push", what=what,
                     content=raw, headers={"Content-Type": media_type})
    if r.status_code not in (200, 201, 202):
        raise status_error(r, what)
    discard(r)
    return sha256_digest(raw)


def _location(session: Session, r: httpx.Response, what: str) -> str:
    """The upload URL a registry hands out: http(s) only, never down to plain HTTP. On another origin
    it gets no credentials (Session.send puts them only on the registry's own)."""
    loc = r.headers.get("Location")
    if not loc:
        raise RegistryError(f"{r.request.url} answered {r.status_code} without a Location header", r.status_code)
    return str(session.redirect_target(r.request.url, loc, what))


def _with_query(url: str, **params: str) -> str:
    """Add parameters to an upload URL, keeping the registry's own (`_state=...`): httpx's params= would replace them."""
    return str(httpx.URL(url).copy_merge_params(params))
