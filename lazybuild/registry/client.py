"""The OCI distribution client: one `Registry` per host, every request through one httpx.Client.

Pieces, in the order a request meets them: `RegistryAuth` (challenges, tokens), httpx's redirect
handling (Authorization is dropped when a redirect leaves the registry's origin), and `_send` here,
which retries connection faults, 429 and 5xx with backoff. Blob bytes are always checked against
their digest before a caller sees them; errors name the URL, the status and what to try.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

import httpx

from ..image import ACCEPT_MANIFESTS, Index, Manifest, Platform, parse_manifest_or_index, sha256_digest
from .auth import Credentials, RegistryAuth, RegistryAuthError, load_credentials
from .reference import Reference

DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5
CHUNK_UPLOAD_BYTES = 16 << 20  # uploads larger than this go in PATCH chunks


class RegistryError(Exception):
    def __init__(self, message: str, status: int | None = None, url: str = ""):
        super().__init__(message)
        self.status, self.url = status, url


def _hint(status: int) -> str:
    return {
        401: "check the credentials (`docker login`)",
        403: "the credentials lack permission for this repository",
        404: "check the repository, tag or digest",
        429: "the registry is rate-limiting; try again later",
    }.get(status, "the registry failed; try again later" if status >= 500 else "")


def _status_error(r: httpx.Response, what: str) -> RegistryError:
    detail = ""
    try:
        errors = r.json().get("errors") or []
        if errors:
            detail = ": " + "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError):
        pass
    hint = _hint(r.status_code)
    return RegistryError(f"{what}: {r.request.method} {r.request.url} answered HTTP {r.status_code}{detail}"
                         + (f"; {hint}" if hint else ""), r.status_code, str(r.request.url))


@functools.lru_cache(maxsize=1)
def system_tls_context() -> ssl.SSLContext:
    """The system CA store, loaded once per process and shared by every registry client without a CA of
    its own (loading it costs ~15 ms; a snapshotter calls this at start so no Prepare pays for it)."""
    return ssl.create_default_context()


def _ssl_context(host: str, certs_dir: str | None) -> ssl.SSLContext:
    """System CAs plus Docker's per-registry CA (`/etc/docker/certs.d/HOST/ca.crt`, or `*.crt` there)."""
    directory = os.path.join(certs_dir or os.environ.get("LAZYBUILD_CERTS_DIR", "/etc/docker/certs.d"), host)
    crts = sorted(n for n in os.listdir(directory) if n.endswith(".crt")) if os.path.isdir(directory) else []
    if not crts:
        return system_tls_context()
    ctx = ssl.create_default_context()
    for name in crts:
        ctx.load_verify_locations(os.path.join(directory, name))
    return ctx


def _speaks_tls(host: str, timeout_s: float) -> bool:
    """Loopback registries may be plain HTTP (as Docker allows) or TLS: ask the port which, with a bare
    TLS handshake (a plain HTTP server answers it with an HTTP error, which fails the handshake)."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name or not port.isdigit():
        name, port = host, "443"
    name = name.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((name, int(port)), timeout=min(timeout_s, 5.0)) as sock:
            with ctx.wrap_socket(sock, server_hostname=name):
                return True
    except (OSError, ssl.SSLError):
        return False


@dataclass
class Resolved:
    """A reference resolved to one image manifest (and the index it was chosen from, if any)."""

    reference: Reference
    manifest: Manifest
    index: Index | None = None


class Registry:
    def __init__(self, host: str, *, insecure: bool = False, loopback: bool | None = None,
                 credentials: Credentials | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 certs_dir: str | None = None, backoff_s: float = 0.2):
        ref = Reference(host, "x")
        self.host = host
        if loopback is None:
            # Loopback and --insecure registries may speak plain HTTP, as Docker's insecure-registries do.
            loopback = (ref.is_loopback or insecure) and not _speaks_tls(ref.api_host, timeout_s)
        self.base = f"{'http' if loopback else 'https'}://{ref.api_host}"
        verify: ssl.SSLContext | bool = False if insecure else _ssl_context(host, certs_dir)
        timeout = httpx.Timeout(timeout_s)
        self._token_client = httpx.Client(timeout=timeout, verify=verify)
        creds = credentials if credentials is not None else load_credentials(host)
        self.auth = RegistryAuth(ref.api_host, creds, self._token_client)
        self.client = httpx.Client(timeout=timeout, verify=verify, auth=self.auth, follow_redirects=True,
                                   headers={"User-Agent": "lazybuild"})
        self.backoff_s = backoff_s

    def close(self) -> None:
        self.client.close()
        self._token_client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the one place requests go through ----------------------------------------------------------

    def _send(self, method: str, url: str, *, scope: str, what: str, stream: bool = False, **kw) -> httpx.Response:
        if not url.startswith("http"):
            url = self.base + url
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                req = self.client.build_request(method, url, **kw)
                req.extensions["lazybuild_scope"] = scope
                r = self.client.send(req, stream=stream)
            except RegistryAuthError as e:
                raise RegistryError(f"{what}: {e}") from None
            except httpx.ConnectError as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or "SSL" in type(e.__context__).__name__:
                    raise RegistryError(
                        f"{what}: TLS verification of {url} failed ({e}); put the registry's CA certificate in "
                        f"/etc/docker/certs.d/{self.host}/ca.crt (or $LAZYBUILD_CERTS_DIR), or use --insecure",
                        None, url) from None
                last = e
                time.sleep(self.backoff_s * 2**attempt)
                continue
            except httpx.TransportError as e:
                last = e
                if method not in ("GET", "HEAD") and "content" in kw and not isinstance(kw["content"], bytes):
                    break  # a streamed body cannot be sent again
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if r.status_code == 429 or (r.status_code >= 500 and r.status_code != 501):
                if attempt + 1 < MAX_ATTEMPTS:
                    retry_after = r.headers.get("Retry-After", "")
                    r.close()
                    delay = float(retry_after) if retry_after.isdigit() else self.backoff_s * 2**attempt
                    time.sleep(min(delay, 30.0))
                    continue
            return r
        raise RegistryError(f"{what}: {method} {url} failed after {MAX_ATTEMPTS} attempts: {last}; "
                            "check that the registry is up and reachable", None, url) from None

    # --- manifests -----------------------------------------------------------------------------------

    def get_manifest(self, ref: Reference) -> tuple[bytes, str]:
        """(exact bytes, media type) of the manifest or index `ref` names; checked against a pinned digest."""
        url = f"/v2/{ref.repository}/manifests/{ref.object}"
        r = self._send("GET", url, scope=f"repository:{ref.repository}:pull", what=f"manifest of {ref}",
                       headers={"Accept": ACCEPT_MANIFESTS})
        if r.status_code != 200:
            raise _status_error(r, f"manifest of {ref}")
        raw = r.content
        if ref.digest and sha256_digest(raw) != ref.digest:
            raise RegistryError(f"manifest of {ref}: {r.request.url} returned bytes with digest {sha256_digest(raw)}, "
                                "not the one asked for (a broken or hostile registry)", 200, str(r.request.url))
        return raw, r.headers.get("Content-Type", "").split(";")[0].strip()

    def resolve(self, ref: Reference, platform: Platform | None = None) -> Resolved:
        raw, media_type = self.get_manifest(ref)
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
        raw, media_type = self.get_manifest(ref.with_digest(chosen.digest))
        try:
            return Resolved(ref.with_digest(chosen.digest), Manifest.parse(raw, media_type or chosen.media_type), doc)
        except ValueError as e:
            raise RegistryError(f"manifest {chosen.digest} of {ref}: {e}") from None

    def put_manifest(self, repository: str, tag_or_digest: str, raw: bytes, media_type: str) -> str:
        url = f"/v2/{repository}/manifests/{tag_or_digest}"
        r = self._send("PUT", url, scope=f"repository:{repository}:pull,push", what=f"push manifest {repository}:{tag_or_digest}",
                       content=raw, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201, 202):
            raise _status_error(r, f"push manifest {repository}:{tag_or_digest}")
        return sha256_digest(raw)

    # --- blobs ---------------------------------------------------------------------------------------

    def blob_url(self, repository: str, digest: str) -> str:
        return f"{self.base}/v2/{repository}/blobs/{digest}"

    def blob_size(self, repository: str, digest: str) -> int | None:
        """Size from HEAD, or from a 1-byte ranged GET where HEAD is refused; None when the blob is absent."""
        scope = f"repository:{repository}:pull"
        r = self._send("HEAD", self.blob_url(repository, digest), scope=scope, what=f"blob {digest}")
        if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
            return int(r.headers["Content-Length"])
        if r.status_code == 404:
            return None
        r = self._send("GET", self.blob_url(repository, digest), scope=scope, what=f"blob {digest}", stream=True,
                       headers={"Range": "bytes=0-0"})
        try:
            if r.status_code == 206:
                m = re.match(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
                if m:
                    return int(m.group(1))
            if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
                return int(r.headers["Content-Length"])
            if r.status_code == 404:
                return None
            raise _status_error(r, f"size of blob {digest}")
        finally:
            r.close()

    def fetch_blob(self, repository: str, digest: str, out: BinaryIO, progress: Callable[[int], None] | None = None) -> int:
        """Download a whole blob into `out`, resuming with Range after a dropped connection; the digest is
        checked over every byte before this returns. Returns the size."""
        url = self.blob_url(repository, digest)
        what = f"blob {digest} of {repository}"
        start = out.tell()
        h = hashlib.sha256()
        got = 0
        for attempt in range(MAX_ATTEMPTS):
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={got}-"} if got else {})}
            r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what, stream=True, headers=headers)
            try:
                if got and r.status_code == 200:  # Range ignored on resume: start over
                    out.seek(start)
                    out.truncate()
                    h, got = hashlib.sha256(), 0
                elif r.status_code not in (200, 206):
                    raise _status_error(r, what)
                for data in r.iter_raw():  # identity encoding: raw bytes, one copy fewer than iter_bytes
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
                time.sleep(self.backoff_s * 2**attempt)
            finally:
                r.close()
        if "sha256:" + h.hexdigest() != digest:
            out.seek(start)
            out.truncate()
            raise RegistryError(f"{what}: {url} sent {got} bytes whose digest is sha256:{h.hexdigest()}, not {digest} "
                                "(corrupt transfer or wrong blob); nothing was kept", None, url)
        return got

    def read_blob(self, repository: str, digest: str) -> bytes:
        """A small blob (a config) in memory, digest checked."""
        buf = io.BytesIO()
        self.fetch_blob(repository, digest, buf)
        return buf.getvalue()

    def stream_range(self, repository: str, digest: str, start: int, end: int):
        """Yield the bytes [start, end) of a blob as they arrive (one request; a 200 answer is skipped to
        `start`). The caller verifies content: a range cannot be checked against the blob digest."""
        url = self.blob_url(repository, digest)
        what = f"range of blob {digest}"
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what, stream=True,
                       headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        try:
            if r.status_code not in (200, 206):
                raise _status_error(r, what)
            skip = start if r.status_code == 200 else 0
            left = end - start
            for data in r.iter_raw():
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                if not data:
                    continue
                data = data[:left]
                left -= len(data)
                yield data
                if left <= 0:
                    return
        finally:
            r.close()

    def read_ranges(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each [start, end) range of a blob, in one request where the registry allows.

        Multi-range answers (multipart/byteranges) are parsed; a 400 to a multi-range request falls back
        to one request per range; a 200 (Range ignored) is sliced. The caller verifies content (chunk
        digests): a range cannot be checked against the blob digest.
        """
        if not ranges:
            return []
        url = self.blob_url(repository, digest)
        what = f"ranges of blob {digest}"
        spec = ",".join(f"{a}-{b - 1}" for a, b in ranges)
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what,
                       headers={"Range": f"bytes={spec}", "Accept-Encoding": "identity"})
        if r.status_code == 400 and len(ranges) > 1:
            return [self.read_ranges(repository, digest, [rg])[0] for rg in ranges]
        if r.status_code == 200:
            body = r.content
            return [body[a:b] for a, b in ranges]
        if r.status_code != 206:
            raise _status_error(r, what)
        ctype = r.headers.get("Content-Type", "")
        if ctype.startswith("multipart/byteranges"):
            parts = _parse_byteranges(r.content, ctype)
        else:
            parts = [(_content_range_start(r.headers.get("Content-Range", ""), url), r.content)]
        out = []
        for a, b in ranges:
            for start, data in parts:
                if start <= a and b <= start + len(data):
                    out.append(data[a - start : b - start])
                    break
            else:
                raise RegistryError(f"{what}: {url} did not return bytes {a}-{b - 1}", 206, url)
        return out

    def read_tail(self, repository: str, digest: str, length: int) -> tuple[int, bytes]:
        """(blob size, its last `length` bytes) in one request (a suffix Range), instead of HEAD + GET:
        a round trip less per layer where the link is slow."""
        url = self.blob_url(repository, digest)
        what = f"tail of blob {digest}"
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what,
                       headers={"Range": f"bytes=-{length}", "Accept-Encoding": "identity"})
        if r.status_code == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("Content-Range", ""))
            if m and int(m.group(2)) + 1 == int(m.group(3)) and len(r.content) == int(m.group(2)) - int(m.group(1)) + 1:
                return int(m.group(3)), r.content
            raise RegistryError(f"{what}: {url} answered a suffix range with Content-Range "
                                f"{r.headers.get('Content-Range')!r}", 206, url)
        if r.status_code == 200:  # Range ignored: the whole blob came
            return len(r.content), r.content[-length:]
        raise _status_error(r, what)

    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self._send("HEAD", self.blob_url(repository, digest), scope=f"repository:{repository}:pull,push",
                       what=f"blob {digest}")
        return r.status_code == 200

    def push_blob(self, repository: str, digest: str, size: int, open_blob: Callable[[], BinaryIO],
                  mount_from: str | None = None, progress: Callable[[int], None] | None = None) -> str:
        """Upload a blob unless it is there; try a cross-repository mount first when `mount_from` is given.
        Returns "exists", "mounted" or "uploaded"."""
        scope = f"repository:{repository}:pull,push" + (f" repository:{mount_from}:pull" if mount_from else "")
        if self.blob_exists(repository, digest):
            return "exists"
        what = f"upload of blob {digest} to {repository}"
        params = {"mount": digest, "from": mount_from} if mount_from else None
        r = self._send("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, what=what, params=params, content=b"")
        if r.status_code == 201 and mount_from:
            return "mounted"
        if r.status_code != 202:
            raise _status_error(r, what)
        location = self._location(r)
        if size <= CHUNK_UPLOAD_BYTES:
            with open_blob() as f:
                data = f.read()
            r = self._send("PUT", _with_query(location, digest=digest), scope=scope, what=what, content=data,
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
                    r = self._send("PATCH", location, scope=scope, what=what, content=data, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(data) - 1}"})
                    if r.status_code != 202:
                        raise _status_error(r, what)
                    location = self._location(r)
                    offset += len(data)
                    if progress:
                        progress(len(data))
            r = self._send("PUT", _with_query(location, digest=digest), scope=scope, what=what, content=b"")
        if r.status_code != 201:
            raise _status_error(r, what)
        return "uploaded"

    def _location(self, r: httpx.Response) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{r.request.url} answered {r.status_code} without a Location header", r.status_code)
        return str(r.request.url.join(loc))


def _with_query(url: str, **params: str) -> str:
    """Add parameters to an upload URL, keeping the registry's own (`_state=...`): httpx's params= would replace them."""
    return str(httpx.URL(url).copy_merge_params(params))


def _content_range_start(value: str, url: str) -> int:
    m = re.match(r"bytes (\d+)-(\d+)/", value)
    if not m:
        raise RegistryError(f"{url}: a 206 answer without a usable Content-Range ({value!r})", 206, url)
    return int(m.group(1))


def _parse_byteranges(body: bytes, content_type: str) -> list[tuple[int, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise RegistryError(f"multipart/byteranges answer without a boundary ({content_type!r})")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        start = None
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                start = _content_range_start(value.strip().decode(), "")
        if start is None:
            raise RegistryError("multipart/byteranges part without Content-Range")
        parts.append((start, data[:-2] if data.endswith(b"\r\n") else data))
    return parts
