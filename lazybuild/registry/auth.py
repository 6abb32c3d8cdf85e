"""Registry authentication: credentials from Docker's config, and the challenge flow (Basic, Bearer tokens).

`RegistryAuth` holds one registry's challenge and tokens; the session (`session.py`) asks it for the
Authorization header of each request to the registry's own origin, and hands it the registry's 401
challenges, which we meet (basic credentials, or a token from the realm) before retrying once. Tokens
are cached per (realm, service, scope). Credentials never reach a log, an error message, or a host
other than the registry and the token realm it named.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass

import httpx

from ..errors import RemoteError
from .bodies import MAX_TOKEN_BYTES, BodyError, discard, printable, read_capped
from .reference import DOCKER_HUB, DOCKER_HUB_API


class RegistryAuthError(RemoteError):
    pass


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # a refresh token (docker login with an identity provider)

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, password=***)"


def docker_config_path() -> str:
    return os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")


def _config_keys(host: str) -> list[str]:
    if host in (DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"):
        return ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def load_credentials(host: str, config_path: str | None = None) -> Credentials | None:
    """Credentials for `host` from Docker's config.json: credHelpers, then credsStore, then auths."""
    path = config_path or docker_config_path()
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RegistryAuthError(f"{path}: cannot read Docker's config: {e}") from None
    keys = _config_keys(host)
    helper = next((config.get("credHelpers", {}).get(k) for k in keys if k in config.get("credHelpers", {})), None)
    helper = helper or config.get("credsStore")
    if helper:
        creds = _from_helper(helper, keys[0] if host in (DOCKER_HUB, DOCKER_HUB_API) else host)
        if creds:
            return creds
    for k in keys:
        entry = config.get("auths", {}).get(k)
        if not entry:
            continue
        if entry.get("identitytoken"):
            return Credentials(identity_token=entry["identitytoken"])
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                raise RegistryAuthError(f"{path}: the auth entry for {k} is not base64 user:password") from None
            return Credentials(user, password)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


def _from_helper(helper: str, server: str) -> Credentials | None:
    try:
        p = subprocess.run([f"docker-credential-{helper}", "get"], input=server, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RegistryAuthError(f"credential helper docker-credential-{helper} is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"credential helper docker-credential-{helper} did not answer in 30 s") from None
    if p.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        d = json.loads(p.stdout)
    except ValueError:
        raise RegistryAuthError(f"credential helper docker-credential-{helper} answered something that is not JSON") from None
    if d.get("Username") == "<token>":
        return Credentials(identity_token=d.get("Secret", ""))
    return Credentials(d.get("Username", ""), d.get("Secret", ""))


_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="https://auth",service="reg",scope="repository:a:pull"` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM_RE.finditer(rest)}
    return scheme.lower(), params


def origin(url: httpx.URL) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in: what "the same server" means here."""
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def is_loopback_host(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class RegistryAuth:
    """Meets Basic and Bearer challenges for one registry; `scope` is given per repository/action.

    Who may be answered: only the registry's own origin (scheme, host, port) gets an Authorization
    header, and only a 401 from that origin may set the challenge we answer. A blob redirect to a
    storage host or a CDN carries its own signed access; a 401 from such a host, asking us to log in
    at a realm of its choosing, is an attempt to collect the user's credentials and is refused
    (`foreign_challenge`). A token realm elsewhere (Docker Hub's auth.docker.io) is fine: the
    registry itself named it. Basic credentials go to a plain-HTTP realm only when the registry itself
    is plain HTTP, and then only on loopback unless the user said --insecure.
    """

    def __init__(self, host: str, credentials: Credentials | None, token_client: httpx.Client,
                 base_url: str = "", insecure: bool = False):
        self.host = host
        self.origin = origin(httpx.URL(base_url or f"https://{host}"))
        self.insecure = insecure
        self.credentials = credentials
        self.token_client = token_client
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def is_own(self, url: httpx.URL) -> bool:
        return origin(url) == self.origin

    def challenged(self, header: str, scope: str) -> None:
        """The registry itself answered 401 with this WWW-Authenticate: answer it from now on."""
        with self._lock:
            self._challenge = parse_challenge(header)
            # A token we held was refused (expired, or narrower scope): drop it and fetch anew.
            self._tokens.pop(self._token_key(scope), None)

    def foreign_challenge(self, url: httpx.URL, header: str) -> RegistryAuthError:
        """The error for a 401 from a host that is not the registry (reached by a redirect)."""
        scheme, params = parse_challenge(header) if header else ("", {})
        asks = f" ({scheme.capitalize()} realm {printable(params.get('realm', ''))!r})" if scheme else ""
        server = f"{url.host}:{url.port}" if url.port else url.host
        return RegistryAuthError(
            f"{server} asked for credentials{asks} after {self.host} redirected {printable(url.path, 120)} there; "
            f"lazybuild sends {self.host}'s credentials and answers challenges only for {self.host} itself, so "
            f"nothing was sent to {server}. A registry's redirect must carry its own access (a signed URL): ask "
            f"the operator of {self.host} to fix its storage redirects, or pull from another registry or mirror")

    def header(self, scope: str, fetch: bool = False) -> str:
        """The Authorization value for a request to the registry (empty before any challenge); with
        `fetch`, a token missing for this scope is fetched from the realm."""
        if self._challenge is None:
            return ""
        scheme, params = self._challenge
        if scheme == "basic":
            if not self.credentials or not self.credentials.username:
                if fetch:
                    raise RegistryAuthError(f"{self.host} wants a username and password: run `docker login {self.host}`")
                return ""
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme != "bearer":
            raise RegistryAuthError(f"{self.host} asks for {printable(scheme, 40)!r} authentication, "
                                    "which lazybuild does not speak")
        key = self._token_key(scope)
        token = self._tokens.get(key)
        if token is None and fetch:
            token = self._fetch_token(params, key[2])
            with self._lock:
                self._tokens[key] = token
        return f"Bearer {token}" if token else ""

    def _token_key(self, scope: str) -> tuple[str, str, str]:
        params = self._challenge[1] if self._challenge else {}
        return params.get("realm", ""), params.get("service", ""), scope or params.get("scope", "")

    def _realm_url(self, realm: str) -> httpx.URL:
        shown = printable(realm)
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise RegistryAuthError(f"{self.host} names the token realm {shown!r}, which is not an http(s) URL")
        c = self.credentials
        if url.scheme == "http" and c and (c.username or c.identity_token):
            # Credentials in clear text only where the user already talks to the registry in clear text:
            # a plain-HTTP registry (loopback, or one the user marked --insecure).
            plain_ok = self.origin[0] == "http" and (self.insecure or is_loopback_host(url.host))
            if not plain_ok:
                raise RegistryAuthError(
                    f"{self.host} asks for a token from {shown}, over plain HTTP; lazybuild does not send your "
                    f"credentials for {self.host} unencrypted. Configure the registry's token realm as https "
                    "(or, for a registry of your own on a trusted network, use --insecure)")
        return url

    def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self.host} sent a Bearer challenge without a realm")
        url = self._realm_url(realm)
        shown = printable(realm)
        query: dict = {k: v for k, v in (("service", params.get("service", "")),) if v}
        if scope:
            query["scope"] = scope.split(" ")  # one scope parameter per resource, as token servers expect
        c = self.credentials
        auth = None
        try:
            if c and c.identity_token:
                req = self.token_client.build_request(
                    "POST", url, data={"grant_type": "refresh_token", "refresh_token": c.identity_token,
                                       "client_id": "lazybuild", **query})
            else:
                req = self.token_client.build_request("GET", url, params=query)
                auth = (c.username, c.password) if c and c.username else None
            # No redirects here (the token client follows none): credentials go to the realm only.
            r = self.token_client.send(req, auth=auth, stream=True)
        except httpx.HTTPError as e:
            raise RegistryAuthError(f"token service {shown} is unreachable: {e}; check the network or the registry") from None
        if r.status_code != 200:
            discard(r)
            if r.status_code in (401, 403):
                raise RegistryAuthError(f"token service {shown} refused the credentials for {self.host} "
                                        f"(HTTP {r.status_code}): run `docker login {self.host}`")
            raise RegistryAuthError(f"token service {shown} answered HTTP {r.status_code} for scope {scope!r}")
        try:
            body = read_capped(r, MAX_TOKEN_BYTES, f"token service {shown}", "token answers")
            d = json.loads(body)
        except BodyError as e:
            raise RegistryAuthError(str(e)) from None
        except httpx.HTTPError as e:
            raise RegistryAuthError(f"token service {shown} dropped the connection: {e}; try again") from None
        except (ValueError, RecursionError):
            raise RegistryAuthError(f"token service {shown} answered something that is not JSON") from None
        token = (d.get("token") or d.get("access_token")) if isinstance(d, dict) else None
        # A token goes into a header: printable ASCII without spaces, as JWTs and opaque tokens are.
        if not isinstance(token, str) or not token or not _TOKEN_RE.fullmatch(token):
            raise RegistryAuthError(f"token service {shown} answered without a usable token")
        return token


_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
