"""The OCI distribution client: one `Registry` per host, every request through one httpx.Client.

Everything a registry answers is input from a stranger, and the client runs as root with the user's
credentials. So `_send`, the one place requests go through, follows redirects itself (a few hops,
http(s) only, never from HTTPS down to plain HTTP), puts the Authorization header only on requests to
the registry's own origin, answers 401 challenges only from that origin (a challenge from a host a
redirect led to is an error naming that host), and retries connection faults, 429 and 5xx with
backoff. Bodies read into memory are capped (manifests, tokens, error bodies); blob bytes are always
checked against their digest before a caller sees them. A registry that answers Range requests with
the whole blob is read only as far as needed, then each blob is downloaded once, verified, and kept
in a temporary file for the later ranges. Errors name the URL, the status and what to try.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import httpx

from ..digest import InvalidDigest, check_digest
from ..errors import RemoteError
from ..image import (ACCEPT_MANIFESTS, INDEX_TYPES, MANIFEST_TYPES, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Index,
                     Manifest, Platform, parse_manifest_or_index, sha256_digest, size_text)
from .auth import Credentials, RegistryAuth, RegistryAuthError, load_credentials
from .bodies import MAX_ERROR_BODY_BYTES, BodyError, discard, printable, read_capped
from .reference import Reference

log = logging.getLogger("lazybuild.registry")

DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5
CHUNK_UPLOAD_BYTES = 16 << 20  # uploads larger than this go in PATCH chunks
# A registry redirects a blob once (to its storage or a CDN), sometimes twice; Go's client (containerd,
# Docker) stops at 10. Past 5 it is a loop or a server making us wander.
MAX_REDIRECTS = 5
REDIRECT_CODES = (301, 302, 303, 307, 308)
# A 206 answer carries the span asked for, plus part headers when it is multipart/byteranges.
MULTIPART_SLACK_BYTES = 4096
PART_HEADER_BYTES = 1024


class RegistryError(RemoteError):
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
    """The error for an unexpected status; reads (and closes) at most the error-body cap of R."""
    detail = ""
    try:
        errors = json.loads(read_capped(r, MAX_ERROR_BODY_BYTES, what, "error bodies")).get("errors") or []
        if errors:
            detail = ": " + printable("; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors), 300)
    except BodyError:
        detail = f" (its body was over the {size_text(MAX_ERROR_BODY_BYTES)} cap for error bodies and was not read)"
    except (ValueError, AttributeError, TypeError, RecursionError, httpx.HTTPError, httpx.StreamError):
        pass  # no usable detail: the status says enough
    finally:
        r.close()
    hint = _hint(r.status_code)
    return RegistryError(f"{what}: {r.request.method} {r.request.url} answered HTTP {r.status_code}{detail}"
                         + (f"; {hint}" if hint else ""), r.status_code, str(r.request.url))


def _read(r: httpx.Response, cap: int, what: str, kind: str) -> bytes:
    try:
        return read_capped(r, cap, what, kind)
    except BodyError as e:
        raise RegistryError(str(e), r.status_code, str(r.request.url)) from None


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


class _KeptBlob:
    """A whole blob, downloaded once and verified, in an unnamed temporary file (gone with the process):
    the later ranges of a registry that ignores Range are read from here."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.f.fileno(), max(0, min(end, self.size) - start), start)  # thread-safe, no seek


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
        # identity: bodies arrive as sent, so caps count real bytes and nothing inflates behind our back.
        headers = {"User-Agent": "lazybuild", "Accept-Encoding": "identity"}
        self._token_client = httpx.Client(timeout=timeout, verify=verify, headers=headers)
        creds = credentials if credentials is not None else load_credentials(host)
        self.auth = RegistryAuth(ref.api_host, creds, self._token_client, base_url=self.base, insecure=insecure)
        # Redirects are followed by _send, not httpx: it decides where credentials go and which hops are fine.
        self.client = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False, headers=headers)
        self.backoff_s = backoff_s
        self.ranges_ignored = False  # set on the first 200 answer to a Range request
        self._kept: dict[str, _KeptBlob] = {}
        self._kept_locks: dict[str, threading.Lock] = {}
        self._kept_guard = threading.Lock()

    def close(self) -> None:
        self.client.close()
        self._token_client.close()
        with self._kept_guard:
            for kept in self._kept.values():
                kept.f.close()
            self._kept.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the one place requests go through ----------------------------------------------------------

    def _send(self, method: str, url: str, *, scope: str, what: str, **kw) -> httpx.Response:
        """Send with auth, redirects and retries. The response is streamed: the caller reads its body
        (within a cap) or hands it to _status_error, and closes it."""
        if not url.startswith("http"):
            url = self.base + url
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                r = self._send_once(method, url, scope, what, kw)
            except RegistryAuthError as e:
                raise RegistryError(f"{what}: {e}", None, url) from None
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
                    discard(r)
                    delay = float(retry_after) if retry_after.isdigit() else self.backoff_s * 2**attempt
                    time.sleep(min(delay, 30.0))
                    continue
            return r
        raise RegistryError(f"{what}: {method} {url} failed after {MAX_ATTEMPTS} attempts: {last}; "
                            "check that the registry is up and reachable", None, url) from None

    def _send_once(self, method: str, url: str, scope: str, what: str, kw: dict) -> httpx.Response:
        """One request, its redirects (GET and HEAD only) and at most one answered challenge."""
        target = httpx.URL(url)
        hops = 0
        answered = False
        while True:
            req = self.client.build_request(method, target, **kw)
            own = self.auth.is_own(req.url)
            if own:  # credentials go to the registry's own origin only, never along a redirect
                header = self.auth.header(scope)
                if header:
                    req.headers["Authorization"] = header
            r = self.client.send(req, stream=True)
            if r.status_code == 401:
                challenge = r.headers.get("WWW-Authenticate", "")
                if not own:
                    discard(r)
                    raise self.auth.foreign_challenge(req.url, challenge)
                if challenge and not answered:
                    discard(r)
                    self.auth.challenged(challenge, scope)
                    self.auth.header(scope, fetch=True)
                    answered = True
                    continue
                return r
            if r.status_code in REDIRECT_CODES and method in ("GET", "HEAD"):
                location = r.headers.get("Location", "")
                discard(r)
                if not location:
                    raise RegistryError(f"{what}: {req.url} answered HTTP {r.status_code} without a Location header",
                                        r.status_code, str(req.url))
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise RegistryError(f"{what}: {url} redirected more than {MAX_REDIRECTS} times (the last hop to "
                                        f"{req.url.host}); a registry redirects a blob once or twice: check the "
                                        "registry and its storage or CDN configuration", r.status_code, url)
                target = self._redirect_target(req.url, location, what)
                kw = {k: v for k, v in kw.items() if k != "params"}  # already part of the URL we were sent to
                continue
            return r

    def _redirect_target(self, current: httpx.URL, location: str, what: str) -> httpx.URL:
        """Where a redirect (or an upload Location) leads, if it is somewhere we go."""
        try:
            target = current.join(location)
        except (httpx.InvalidURL, ValueError):
            raise RegistryError(f"{what}: {current} redirected to {printable(location)!r}, which is not a URL",
                                None, str(current)) from None
        if target.scheme not in ("http", "https") or not target.host:
            raise RegistryError(f"{what}: {current} redirected to {printable(str(target))!r}; lazybuild follows "
                                "redirects to http(s) URLs only (a broken or hostile registry)", None, str(current))
        if target.scheme == "http" and (current.scheme == "https" or self.base.startswith("https:")):
            raise RegistryError(f"{what}: {current} redirected from HTTPS to plain HTTP ({target.host}); lazybuild "
                                "does not give up TLS for a redirect: ask the registry's operator to redirect to "
                                "https", None, str(current))
        return target

    # --- manifests -----------------------------------------------------------------------------------

    def get_manifest(self, ref: Reference) -> tuple[bytes, str]:
        """(exact bytes, media type) of the manifest or index `ref` names; checked against a pinned digest.
        Bodies past MAX_MANIFEST_BYTES are refused before they are read whole."""
        url = f"/v2/{ref.repository}/manifests/{ref.object}"
        what = f"manifest of {ref}"
        for attempt in range(MAX_ATTEMPTS):
            r = self._send("GET", url, scope=f"repository:{ref.repository}:pull", what=what,
                           headers={"Accept": ACCEPT_MANIFESTS})
            if r.status_code != 200:
                raise _status_error(r, what)
            try:
                raw = _read(r, MAX_MANIFEST_BYTES, what, "manifests")
                break
            except httpx.TransportError as e:  # dropped mid-body: ask again, as a dropped request is
                if attempt + 1 == MAX_ATTEMPTS:
                    raise RegistryError(f"{what}: {r.request.url} kept dropping the connection ({e}); "
                                        "try again later", None, str(r.request.url)) from None
                time.sleep(self.backoff_s * 2**attempt)
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
        what = f"push manifest {repository}:{tag_or_digest}"
        r = self._send("PUT", url, scope=f"repository:{repository}:pull,push", what=what,
                       content=raw, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201, 202):
            raise _status_error(r, what)
        discard(r)
        return sha256_digest(raw)

    # --- blobs ---------------------------------------------------------------------------------------

    def blob_url(self, repository: str, digest: str) -> str:
        # The one place a digest becomes part of a URL: whatever the caller read it from, it is checked.
        return f"{self.base}/v2/{repository}/blobs/{check_digest(digest, f'blob digest in {repository}')}"

    def blob_size(self, repository: str, digest: str) -> int | None:
        """Size from HEAD, or from a 1-byte ranged GET where HEAD is refused; None when the blob is absent."""
        scope = f"repository:{repository}:pull"
        r = self._send("HEAD", self.blob_url(repository, digest), scope=scope, what=f"blob {digest}")
        discard(r)
        if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
            return int(r.headers["Content-Length"])
        if r.status_code == 404:
            return None
        r = self._send("GET", self.blob_url(repository, digest), scope=scope, what=f"blob {digest}",
                       headers={"Range": "bytes=0-0"})
        if r.status_code == 206:
            discard(r)
            m = re.match(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
            if m:
                return int(m.group(1))
        if r.status_code == 200:
            self._note_ranges_ignored()
            r.close()  # the whole blob is coming: drop it, its length is in the header
            if r.headers.get("Content-Length", "").isdigit():
                return int(r.headers["Content-Length"])
            raise RegistryError(f"size of blob {digest}: {r.request.url} answered neither HEAD nor a ranged GET "
                                "with a length", 200, str(r.request.url))
        if r.status_code == 404:
            discard(r)
            return None
        raise _status_error(r, f"size of blob {digest}")

    def fetch_blob(self, repository: str, digest: str, out: BinaryIO, progress: Callable[[int], None] | None = None,
                   *, size: int | None = None, cap: tuple[int, str] | None = None) -> int:
        """Download a whole blob into `out`, resuming with Range after a dropped connection; the digest is
        checked over every byte before this returns, and on a mismatch `out` is left as it was. With
        `size` (its descriptor's) or `cap` ((bytes, what kind)), a registry sending more is cut off
        there. Returns the size."""
        url = self.blob_url(repository, digest)
        what = f"blob {digest} of {repository}"
        limit = size if size is not None else (cap[0] if cap else None)
        start = out.tell()
        h = hashlib.sha256()
        got = 0
        for attempt in range(MAX_ATTEMPTS):
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={got}-"} if got else {})}
            r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what, headers=headers)
            try:
                if got and r.status_code == 200:  # Range ignored on resume: start over
                    out.seek(start)
                    out.truncate()
                    h, got = hashlib.sha256(), 0
                elif got and r.status_code == 206:
                    if _content_range_start(r.headers.get("Content-Range", ""), url) != got:
                        raise RegistryError(f"{what}: {url} resumed at another offset than byte {got} "
                                            f"(Content-Range {printable(r.headers.get('Content-Range', ''))!r})", 206, url)
                elif r.status_code not in (200, 206):
                    raise _status_error(r, what)
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
                time.sleep(self.backoff_s * 2**attempt)
            finally:
                r.close()
        if "sha256:" + h.hexdigest() != digest:
            out.seek(start)
            out.truncate()
            raise RegistryError(f"{what}: {url} sent {got} bytes whose digest is sha256:{h.hexdigest()}, not {digest} "
                                "(corrupt transfer or wrong blob); nothing was kept", None, url)
        return got

    def read_blob(self, repository: str, digest: str, size: int | None = None) -> bytes:
        """A small blob (a config) in memory, digest checked, at most MAX_CONFIG_BYTES (and `size`, the
        descriptor's, when given)."""
        if size is not None and size > MAX_CONFIG_BYTES:
            raise RegistryError(f"blob {digest} of {repository}: its descriptor says {size} bytes, over the "
                                f"{size_text(MAX_CONFIG_BYTES)} cap for configs")
        buf = io.BytesIO()
        self.fetch_blob(repository, digest, buf, size=size, cap=(MAX_CONFIG_BYTES, "configs"))
        return buf.getvalue()

    # --- ranges --------------------------------------------------------------------------------------
    #
    # The mounter and the snapshotter read a layer a chunk at a time: the footer and TOC at open
    # (read_tail, read_ranges), each missed chunk (read_ranges), the prefetch span (stream_range). A
    # registry that answers those with 200 and the whole blob would otherwise make every chunk cost the
    # whole blob. The first such answer is read only as far as the ranges need; from then on this client
    # asks that registry for no more ranges: each blob is downloaded once, verified against its digest,
    # and its ranges are read from that temporary file.

    def _note_ranges_ignored(self) -> None:
        if not self.ranges_ignored:
            self.ranges_ignored = True
            log.warning("%s answers Range requests with whole blobs: each blob it serves is now downloaded once, "
                        "verified, and read from a temporary file", self.host)

    def _kept_lock(self, digest: str) -> threading.Lock:
        with self._kept_guard:
            return self._kept_locks.setdefault(digest, threading.Lock())

    def _kept_blob(self, repository: str, digest: str) -> _KeptBlob | None:
        """The whole verified blob when this registry ignores Range (downloaded now if need be), else None."""
        kept = self._kept.get(digest)
        if kept is not None or not self.ranges_ignored:
            return kept
        with self._kept_lock(digest):  # concurrent readers of one blob download it once
            kept = self._kept.get(digest)
            if kept is None:
                f = tempfile.TemporaryFile(prefix="lazybuild-blob-")
                try:
                    size = self.fetch_blob(repository, digest, f)
                    f.flush()  # read() goes to the file descriptor (pread), past Python's buffer
                except BaseException:
                    f.close()
                    raise
                kept = self._kept[digest] = _KeptBlob(f, size)
        return kept

    def _keep_answer(self, r: httpx.Response, repository: str, digest: str, what: str) -> _KeptBlob:
        """Keep the whole blob a 200 answer is bringing anyway (verified), rather than asking again."""
        with self._kept_lock(digest):
            kept = self._kept.get(digest)
            if kept is not None:
                r.close()
                return kept
            f = tempfile.TemporaryFile(prefix="lazybuild-blob-")
            h, got = hashlib.sha256(), 0
            try:
                for data in r.iter_raw():
                    f.write(data)
                    h.update(data)
                    got += len(data)
            except httpx.TransportError:
                f.close()
                f = None
            finally:
                r.close()
            if f is not None:
                if "sha256:" + h.hexdigest() != digest:
                    f.close()
                    raise RegistryError(f"{what}: {r.request.url} sent {got} bytes whose digest is "
                                        f"sha256:{h.hexdigest()}, not {digest} (corrupt transfer or wrong blob)",
                                        200, str(r.request.url))
                f.flush()
                kept = self._kept[digest] = _KeptBlob(f, got)
                return kept
        kept = self._kept_blob(repository, digest)  # the connection dropped: download it, with resumes
        assert kept is not None
        return kept

    def stream_range(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes [start, end) of a blob as they arrive (one request; a 200 answer is read only up
        to `end`). The caller verifies content: a range cannot be checked against the blob digest."""
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            pos = start
            while pos < end:
                data = kept.read(pos, min(end, pos + (1 << 20)))
                if not data:
                    return
                pos += len(data)
                yield data
            return
        url = self.blob_url(repository, digest)
        what = f"range of blob {digest}"
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what,
                       headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        try:
            if r.status_code not in (200, 206):
                raise _status_error(r, what)
            if r.status_code == 200:
                self._note_ranges_ignored()
            elif _content_range_start(r.headers.get("Content-Range", ""), url) != start:
                raise RegistryError(f"{what}: {url} answered bytes {printable(r.headers.get('Content-Range', ''))!r} "
                                    f"when asked for {start}-{end - 1}", 206, url)
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
        to one request per range; a 200 (Range ignored) is read only up to the last byte needed. The
        caller verifies content (chunk digests): a range cannot be checked against the blob digest.
        """
        if not ranges:
            return []
        if any(a < 0 or b <= a for a, b in ranges):
            raise ValueError(f"ranges {ranges[:4]!r} of blob {digest}: each must be [start, end) with start < end")
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            out = [kept.read(a, b) for a, b in ranges]
            if any(len(p) != b - a for p, (a, b) in zip(out, ranges)):
                raise RegistryError(f"ranges of blob {digest}: the blob is {kept.size} bytes, shorter than the "
                                    f"ranges asked for (up to byte {max(b for _, b in ranges)})")
            return out
        url = self.blob_url(repository, digest)
        what = f"ranges of blob {digest}"
        spec = ",".join(f"{a}-{b - 1}" for a, b in ranges)
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what,
                       headers={"Range": f"bytes={spec}", "Accept-Encoding": "identity"})
        try:
            if r.status_code == 400 and len(ranges) > 1:
                discard(r)
                return [self.read_ranges(repository, digest, [rg])[0] for rg in ranges]
            if r.status_code == 200:
                self._note_ranges_ignored()
                return _slice_stream(r, ranges, what)
            if r.status_code != 206:
                raise _status_error(r, what)
            span = max(b for _, b in ranges) - min(a for a, _ in ranges)
            body = _read(r, span + PART_HEADER_BYTES * len(ranges) + MULTIPART_SLACK_BYTES, what, "range answers")
        finally:
            r.close()
        ctype = r.headers.get("Content-Type", "")
        if ctype.startswith("multipart/byteranges"):
            parts = _parse_byteranges(body, ctype)
        else:
            parts = [(_content_range_start(r.headers.get("Content-Range", ""), url), body)]
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
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            return kept.size, kept.read(max(0, kept.size - length), kept.size)
        url = self.blob_url(repository, digest)
        what = f"tail of blob {digest}"
        r = self._send("GET", url, scope=f"repository:{repository}:pull", what=what,
                       headers={"Range": f"bytes=-{length}", "Accept-Encoding": "identity"})
        if r.status_code == 206:
            body = _read(r, length, what, "range answers")
            m = re.match(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("Content-Range", ""))
            if m and int(m.group(2)) + 1 == int(m.group(3)) and len(body) == int(m.group(2)) - int(m.group(1)) + 1:
                return int(m.group(3)), body
            raise RegistryError(f"{what}: {url} answered a suffix range with Content-Range "
                                f"{printable(r.headers.get('Content-Range', ''))!r}", 206, url)
        if r.status_code == 200:  # Range ignored: the whole blob is coming, and the tail is at its end
            self._note_ranges_ignored()
            kept = self._keep_answer(r, repository, digest, what)
            return kept.size, kept.read(max(0, kept.size - length), kept.size)
        raise _status_error(r, what)

    # --- push ----------------------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self._send("HEAD", self.blob_url(repository, digest), scope=f"repository:{repository}:pull,push",
                       what=f"blob {digest}")
        discard(r)
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
            discard(r)
            return "mounted"
        if r.status_code != 202:
            raise _status_error(r, what)
        discard(r)
        location = self._location(r, what)
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
                    discard(r)
                    location = self._location(r, what)
                    offset += len(data)
                    if progress:
                        progress(len(data))
            r = self._send("PUT", _with_query(location, digest=digest), scope=scope, what=what, content=b"")
        if r.status_code != 201:
            raise _status_error(r, what)
        discard(r)
        return "uploaded"

    def _location(self, r: httpx.Response, what: str) -> str:
        """The upload URL a registry hands out: http(s) only, never down to plain HTTP. On another origin
        it gets no credentials (_send puts them only on the registry's own)."""
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{r.request.url} answered {r.status_code} without a Location header", r.status_code)
        return str(self._redirect_target(r.request.url, loc, what))


def _slice_stream(r: httpx.Response, ranges: list[tuple[int, int]], what: str) -> list[bytes]:
    """The ranges out of a whole-blob (200) body, reading it only up to the last byte needed and
    keeping only the bytes inside the ranges."""
    need = max(b for _, b in ranges)
    parts = [bytearray() for _ in ranges]
    pos = 0
    try:
        for data in r.iter_raw():
            end = pos + len(data)
            for part, (a, b) in zip(parts, ranges):
                if a < end and b > pos:
                    part += data[max(a - pos, 0) : min(b, end) - pos]
            pos = end
            if pos >= need:
                break
    finally:
        r.close()  # the rest of the blob is not read: the connection is dropped instead
    if pos < need:
        raise RegistryError(f"{what}: {r.request.url} answered the whole blob (HTTP 200), {pos} bytes, shorter "
                            f"than the ranges asked for (up to byte {need})", 200, str(r.request.url))
    return [bytes(p) for p in parts]


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
