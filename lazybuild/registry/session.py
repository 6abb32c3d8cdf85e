"""One registry host's connection, and the one place every request to it goes through.

Everything a registry answers is input from a stranger, and the client runs as root with the user's
credentials. So `Session.send` follows redirects itself (a few hops, http(s) only, never from HTTPS
down to plain HTTP), puts the Authorization header only on requests to the registry's own origin,
answers 401 challenges only from that origin (a challenge from a host a redirect led to is an error
naming that host), and retries connection faults, 429 and 5xx. A dropped connection or a 502/503/504
(a proxy or load balancer whose backend failed) is retried at once on another connection, the next
tries after a short backoff: a lazy mount asks for many small ranges, and a fixed pause per fault
would add up to more than the reads themselves. What a request means (a manifest, a blob, an
upload) is for the modules that call it.
"""

from __future__ import annotations

import logging
import ssl
import time

import httpx

from .auth import Credentials, RegistryAuth, RegistryAuthError, load_credentials
from .bodies import discard, printable
from .errors import RegistryError
from .reference import Reference
from .tls import speaks_tls, ssl_context

log = logging.getLogger("lazybuild.registry")

DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5
# A registry redirects a blob once (to its storage or a CDN), sometimes twice; Go's client (containerd,
# Docker) stops at 10. Past 5 it is a loop or a server making us wander.
MAX_REDIRECTS = 5
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Answers that usually mean "this connection's backend failed", not "the registry is overloaded":
# retried at once on another connection before any backoff.
RETRY_AT_ONCE_CODES = (502, 503, 504)


class Session:
    """The httpx clients, auth and retry policy of one registry host, and what we learned about it."""

    def __init__(self, host: str, *, insecure: bool = False, loopback: bool | None = None,
                 credentials: Credentials | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 certs_dir: str | None = None, backoff_s: float = 0.2):
        ref = Reference(host, "x")
        self.host = host
        if loopback is None:
            # Loopback and --insecure registries may speak plain HTTP, as Docker's insecure-registries do.
            loopback = (ref.is_loopback or insecure) and not speaks_tls(ref.api_host, timeout_s)
        self.base = f"{'http' if loopback else 'https'}://{ref.api_host}"
        verify: ssl.SSLContext | bool = False if insecure else ssl_context(host, certs_dir)
        timeout = httpx.Timeout(timeout_s)
        # identity: bodies arrive as sent, so caps count real bytes and nothing inflates behind our back.
        headers = {"User-Agent": "lazybuild", "Accept-Encoding": "identity"}
        self._token_client = httpx.Client(timeout=timeout, verify=verify, headers=headers)
        creds = credentials if credentials is not None else load_credentials(host)
        self.auth = RegistryAuth(ref.api_host, creds, self._token_client, base_url=self.base, insecure=insecure)
        # Redirects are followed by send, not httpx: it decides where credentials go and which hops are fine.
        self.client = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False, headers=headers)
        self.backoff_s = backoff_s
        # Learned about the server, like its challenge: every reader of this host must stop asking for
        # ranges once it has answered one with the whole blob (see ranges.py).
        self.ranges_ignored = False  # set on the first 200 answer to a Range request
        self.multirange_refused = False  # set when a multi-range request is refused or answered whole

    def pause(self, attempt: int) -> None:
        """The wait before retry number `attempt + 1`: none before the first (it goes out at once, on
        another connection), then backoff_s doubling."""
        if attempt > 0:
            time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def close(self) -> None:
        self.client.close()
        self._token_client.close()

    def note_multirange_refused(self, status: int) -> None:
        if not self.multirange_refused:
            self.multirange_refused = True
            log.info("%s answered a multi-range request with HTTP %d: ranges are asked for one per request "
                     "(in parallel) from now on", self.host, status)

    def note_ranges_ignored(self) -> None:
        if not self.ranges_ignored:
            self.ranges_ignored = True
            log.warning("%s answers Range requests with whole blobs: each blob it serves is now downloaded once, "
                        "verified, and read from a temporary file", self.host)

    def send(self, method: str, url: str, *, scope: str, what: str, **kw) -> httpx.Response:
        """Send with auth, redirects and retries. The response is streamed: the caller reads its body
        (within a cap) or hands it to status_error, and closes it."""
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
                self.pause(attempt)
                continue
            except httpx.TransportError as e:  # the connection dropped: httpx does not pool it again
                last = e
                if method not in ("GET", "HEAD") and "content" in kw and not isinstance(kw["content"], bytes):
                    break  # a streamed body cannot be sent again
                self.pause(attempt)
                continue
            if r.status_code in RETRY_AT_ONCE_CODES and attempt + 1 < MAX_ATTEMPTS:
                # Closed unread, the connection is dropped rather than pooled: the retry goes out on another.
                r.close()
                last = RegistryError(f"HTTP {r.status_code}", r.status_code, url)
                self.pause(attempt)
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
                target = self.redirect_target(req.url, location, what)
                kw = {k: v for k, v in kw.items() if k != "params"}  # already part of the URL we were sent to
                continue
            return r

    def redirect_target(self, current: httpx.URL, location: str, what: str) -> httpx.URL:
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
