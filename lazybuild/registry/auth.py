"""Registry authentication: credentials from Docker's config, and the challenge flow (Basic, Bearer tokens).

`RegistryAuth` is an httpx auth flow: a request goes out with what we already hold for its host and
scope; a 401 answers with a `WWW-Authenticate` challenge, which we meet (basic credentials, or a token
from the realm) and retry once. Tokens are cached per (realm, service, scope). Credentials never reach
a log or an error message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass

import httpx

from .reference import DOCKER_HUB, DOCKER_HUB_API


class RegistryAuthError(Exception):
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


class RegistryAuth(httpx.Auth):
    """Meets Basic and Bearer challenges for one registry host; `scope` is set per repository/action."""

    def __init__(self, host: str, credentials: Credentials | None, token_client: httpx.Client):
        self.host = host
        self.credentials = credentials
        self.token_client = token_client
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def auth_flow(self, request: httpx.Request):
        scope = request.extensions.get("lazybuild_scope", "")
        header = self._header_for(scope)
        if header:
            request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401 or request.url.host != httpx.URL(f"//{self.host}").host:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        if not challenge:
            return
        with self._lock:
            self._challenge = parse_challenge(challenge)
            # A token we held was refused (expired, or narrower scope): drop it and fetch anew.
            self._tokens.pop(self._token_key(scope), None)
        response.read()
        header = self._header_for(scope, fetch=True)
        if header:
            request.headers["Authorization"] = header
            yield request

    def _token_key(self, scope: str) -> tuple[str, str, str]:
        params = self._challenge[1] if self._challenge else {}
        return params.get("realm", ""), params.get("service", ""), scope or params.get("scope", "")

    def _header_for(self, scope: str, fetch: bool = False) -> str:
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
            raise RegistryAuthError(f"{self.host} asks for {scheme!r} authentication, which lazybuild does not speak")
        key = self._token_key(scope)
        token = self._tokens.get(key)
        if token is None and fetch:
            token = self._fetch_token(params, key[2])
            with self._lock:
                self._tokens[key] = token
        return f"Bearer {token}" if token else ""

    def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self.host} sent a Bearer challenge without a realm")
        query: dict = {k: v for k, v in (("service", params.get("service", "")),) if v}
        if scope:
            query["scope"] = scope.split(" ")  # one scope parameter per resource, as token servers expect
        c = self.credentials
        try:
            if c and c.identity_token:
                r = self.token_client.post(realm, data={"grant_type": "refresh_token", "refresh_token": c.identity_token,
                                                        "client_id": "lazybuild", **query})
            else:
                auth = (c.username, c.password) if c and c.username else None
                r = self.token_client.get(realm, params=query, auth=auth)
        except httpx.HTTPError as e:
            raise RegistryAuthError(f"token service {realm} is unreachable: {e}; check the network or the registry") from None
        if r.status_code in (401, 403):
            raise RegistryAuthError(f"token service {realm} refused the credentials for {self.host} "
                                    f"(HTTP {r.status_code}): run `docker login {self.host}`")
        if r.status_code != 200:
            raise RegistryAuthError(f"token service {realm} answered HTTP {r.status_code} for scope {scope!r}")
        try:
            d = r.json()
        except ValueError:
            raise RegistryAuthError(f"token service {realm} answered something that is not JSON") from None
        token = d.get("token") or d.get("access_token")
        if not token:
            raise RegistryAuthError(f"token service {realm} answered without a token")
        return token
