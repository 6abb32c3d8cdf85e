"""Whole blobs: a blob's URL (the one place a digest enters one), its size, and downloads that are
checked against the digest over every byte before a caller sees them (resumed after a dropped
connection; cut off at the descriptor's size or the cap for their kind). Ranges are in ranges.py.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO, Callable

import httpx

from ..digest import check_digest
from ..image import MAX_CONFIG_BYTES, size_text
from .bodies import discard, printable
from .errors import RegistryError, status_error
from .session import MAX_ATTEMPTS, Session


def blob_url(session: Session, repository: str, digest: str) -> str:
    # The one place a digest becomes part of a URL: whatever the caller read it from, it is checked.
    return f"{session.base}/v2/{repository}/blobs/{check_digest(digest, f'blob digest in {repository}')}"


def content_range_start(value: str, url: str) -> int:
    m = re.match(r"bytes (\d+)-(\d+)/", value)
    if not m:
        raise RegistryError(f"{url}: a 206 answer without a usable Content-Range ({value!r})", 206, url)
    return int(m.group(1))


def blob_size(session: Session, repository: str, digest: str) -> int | None:
    """Size from HEAD, or from a 1-byte ranged GET where HEAD is refused; None when the blob is absent."""
    scope = f"repository:{repository}:pull"
    r = session.send("HEAD", blob_url(session, repository, digest), scope=scope, what=f"blob {digest}")
    discard(r)
    if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
        return int(r.headers["Content-Length"])
    if r.status_code == 404:
        return None
    r = session.send("GET", blob_url(session, repository, digest), scope=scope, what=f"blob {digest}",
                     headers={"Range": "bytes=0-0"})
    if r.status_code == 206:
        discard(r)
        m = re.match(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
        if m:
            return int(m.group(1))
    if r.status_code == 200:
        session.note_ranges_ignored()
        r.close()  # the whole blob is coming: drop it, its length is in the header
        if r.headers.get("Content-Length", "").isdigit():
            return int(r.headers["Content-Length"])
        raise RegistryError(f"size of blob {digest}: {r.request.url} answered neither HEAD nor a ranged GET "
                            "with a length", 200, str(r.request.url))
    if r.status_code == 404:
        discard(r)
        return None
    raise status_error(r, f"size of blob {digest}")


def fetch_blob(session: Session, repository: str, digest: str, out: BinaryIO,
               progress: Callable[[int], None] | None = None, *, size: int | None = None,
               cap: tuple[int, str] | None = None) -> int:
    """Download a whole blob into `out`, resuming with Range after a dropped connection; the digest is
    checked over every byte before this returns, and on a mismatch `out` is left as it was. With
    `size` (its descriptor's) or `cap` ((bytes, what kind)), a registry sending more is cut off
    there. Returns the size."""
    url = blob_url(session, repository, digest)
    what = f"blob {digest} of {repository}"
    limit = size if size is not None else (cap[0] if cap else None)
    start = out.tell()
    h = hashlib.sha256()
    got = 0
    for attempt in range(MAX_ATTEMPTS):
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={got}-"} if got else {})}
        r = session.send("GET", url, scope=f"repository:{repository}:pull", what=what, headers=headers)
        try:
            if got and r.status_code == 200:  # Range ignored on resume: start over
                out.seek(start)
                out.truncate()
                h, got = hashlib.sha256(), 0
            elif got and r.status_code == 206:
                if content_range_start(r.headers.get("Content-Range", ""), url) != got:
                    raise RegistryError(f"{what}: {url} resumed at another offset than byte {got} "
                                        f"(Content-Range {printable(r.headers.get('Content-Range', ''))!r})", 206, url)
            elif r.status_code not in (200, 206):
                raise status_error(r, what)
            for data in r.iter_raw():  # identity encoding: raw bytes, one copy fewer than iter_bytes
                if limit is not None and got + len(data) > limit:
                    out.seek(start)
                    out.truncate()
                    bound = (f"the {size} bytes its descriptor gives" if size is not None
                             else f"the {size_text(cap[0])} cap for {cap[1]}")
                    raise RegistryError(f"{what}: {url} sent more than {bound}; nothing was kept", None, url)
                out.write(data)
                h.update(data)
                got += len(data)
                if progress:
                    progress(len(data))
            break
        except httpx.TransportError:
            if attempt + 1 == MAX_ATTEMPTS:
                raise RegistryError(f"{what}: {url} kept dropping the connection after {got} bytes; "
                                    "try again later", None, url) from None
            session.pause(attempt)  # the first resume at once (a new connection), then backoff
        finally:
            r.close()
    if "sha256:" + h.hexdigest() != digest:
        out.seek(start)
        out.truncate()
        raise RegistryError(f"{what}: {url} sent {got} bytes whose digest is sha256:{h.hexdigest()}, not {digest} "
                            "(corrupt transfer or wrong blob); nothing was kept", None, url)
    return got


def read_blob(session: Session, repository: str, digest: str, size: int | None = None) -> bytes:
    """A small blob (a config) in memory, digest checked, at most MAX_CONFIG_BYTES (and `size`, the
    descriptor's, when given)."""
    if size is not None and size > MAX_CONFIG_BYTES:
        raise RegistryError(f"blob {digest} of {repository}: its descriptor says {size} bytes, over the "
                            f"{size_text(MAX_CONFIG_BYTES)} cap for configs")
    buf = io.BytesIO()
    fetch_blob(session, repository, digest, buf, size=size, cap=(MAX_CONFIG_BYTES, "configs"))
    return buf.getvalue()
