"""The test-only registry parts (the registry itself is lazybuild.testing.registry's RegistryProcess): a small
token issuer of ours for its token auth; a fault-injecting proxy in front of one (which can also play an evil
registry); and `EvilServer`, a second host that answers what a test says."""

from __future__ import annotations

import base64
import datetime
import http.client
import http.server
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse

from lazybuild.testing.registry import free_port


class TokenIssuer:
    """A token service as docker/distribution's token auth expects: RS256 JWTs with an x5c chain that
    the registry checks against `rootcertbundle`. Grants what the basic credentials allow."""

    def __init__(self, workdir: str, user: str, password: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazybuild-token-issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2)).sign(self.key, hashes.SHA256()))
        self.bundle = os.path.join(workdir, "token-bundle.pem")
        with open(self.bundle, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der_b64 = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued = 0
        self.ttl_s = 300
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth == "Basic " + base64.b64encode(f"{issuer.user}:{issuer.password}".encode()).decode()
                if auth and not ok:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in q.get("scope", []):
                    for one in scope.split(" "):
                        kind, _, rest = one.partition(":")
                        repo, _, actions = rest.rpartition(":")
                        granted = actions.split(",") if ok else [a for a in actions.split(",") if a == "pull" and repo.startswith("public/")]
                        access.append({"type": kind, "name": repo, "actions": granted})
                body = json.dumps({"token": issuer.token(q.get("service", [""])[0], access), "expires_in": issuer.ttl_s}).encode()
                issuer.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.realm = f"http://127.0.0.1:{self.port}/token"

    def token(self, service: str, access: list) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.der_b64]}
        claims = {"iss": "lazybuild-test", "sub": self.user, "aud": service, "exp": now + self.ttl_s, "nbf": now - 60,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64(signature)

    def registry_config(self) -> dict:
        return {"realm": self.realm, "service": "lazybuild-test-registry", "issuer": "lazybuild-test",
                "rootcertbundle": self.bundle}

    def stop(self) -> None:
        self.server.shutdown()


class _QuietServer(http.server.ThreadingHTTPServer):
    """A test server that does not print a traceback when a client hangs up (clients here do, on purpose)."""

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """An HTTP proxy in front of a registry that misbehaves on purpose, a fault at a time.

    faults (set by tests, consumed as they fire):
      drop_body: n   - close the connection halfway through the next n blob bodies
      status: [(code, n)] - answer `code` to the next n requests
      ignore_range   - answer 200 with the whole body to ranged GETs
      reject_multirange - answer 400 to multi-range requests
      redirect_blobs - answer 307 to blob GETs, pointing at a second port that serves them
      require_basic  - the main port answers 401 (Basic) to requests without credentials
      corrupt_blobs  - flip the first byte of whole-blob bodies
      corrupt_ranges - flip a byte in the middle of ranged (206) bodies
      refuse_head    - answer 405 to HEAD (as some object stores do)
    and the evil registry's (kept until changed):
      redirect_blobs_to: URL - answer 307 to blob GETs on the main port, pointing at URL + the path
      location: TEXT - answer 307 to blob GETs on the main port with this exact Location
      challenge: TEXT - the main port answers 401 with this WWW-Authenticate to requests without credentials
      manifests: {tag: (body, content_type, headers)} - serve this for GET/HEAD of /v2/.../manifests/<tag>
      error_body: (code, body) - answer every request with this status and body
    `blob_bytes_sent` counts the body bytes of blob GETs that the client really took (written in 64 KiB
    pieces; a client that hangs up stops the count).
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults: dict = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[int, str, str, dict]] = []
        self.blob_bytes_sent = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                with proxy.lock:
                    proxy.requests.append((self.server.server_port, method, self.path, dict(self.headers)))
                    fault = proxy._take(method, self.path, self.headers, self.server.server_port)
                if fault == "need_auth":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", proxy.faults.get("challenge") or 'Basic realm="proxy"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "redirect":
                    f = proxy.faults
                    target = f.get("location") or (f.get("redirect_blobs_to") or f"http://127.0.0.1:{proxy.redirect_port}") + self.path
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if isinstance(fault, tuple):  # a canned answer: (status, headers, body)
                    status, extra, data = fault
                    self.send_response(status)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                    return
                if isinstance(fault, int):
                    self.send_response(fault)
                    self.send_header("Content-Length", "0")
                    if fault == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if fault == "reject_multirange":
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "ignore_range":
                    headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(method, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v.replace(f"http://{proxy.upstream}", f"http://127.0.0.1:{self.server.server_port}"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "corrupt_body" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if fault == "corrupt_middle" and data:
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
                if fault == "drop_body" and method == "GET":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if method != "HEAD":
                    self._write(data, counted="/blobs/sha256:" in self.path and method == "GET")
                conn.close()

            def _write(self, data, counted):
                view = memoryview(data)
                for i in range(0, len(data), 1 << 16):
                    piece = view[i:i + (1 << 16)]
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True  # the client hung up: it takes no more
                        return
                    if counted:
                        with proxy.lock:
                            proxy.blob_bytes_sent += len(piece)

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

            def do_PUT(self):
                self._forward("PUT")

            def do_POST(self):
                self._forward("POST")

            def do_PATCH(self):
                self._forward("PATCH")

        self.server = _QuietServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_port
        self.host = f"127.0.0.1:{self.port}"
        self.redirect_server = _QuietServer(("127.0.0.1", free_port()), Handler)
        self.redirect_port = self.redirect_server.server_port
        for s in (self.server, self.redirect_server):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def _take(self, method, path, headers, port):
        f = self.faults
        is_blob_get = method == "GET" and "/blobs/sha256:" in path
        if f.get("error_body"):
            code, body = f["error_body"]
            return code, {"Content-Type": "application/json"}, body
        if f.get("challenge") and port == self.port and not headers.get("Authorization"):
            return "need_auth"
        if "/manifests/" in path and path.rsplit("/", 1)[-1] in (f.get("manifests") or {}):
            body, content_type, extra = f["manifests"][path.rsplit("/", 1)[-1]]
            return 200, {"Content-Type": content_type, **extra}, body
        if is_blob_get and port == self.port and (f.get("redirect_blobs_to") or f.get("location")):
            return "redirect"
        if f.get("status"):
            code, n = f["status"][0]
            f["status"][0] = (code, n - 1)
            if n - 1 <= 0:
                f["status"].pop(0)
            return code
        if f.get("require_basic") and port == self.port and not headers.get("Authorization", "").startswith("Basic "):
            return "need_auth"
        if method == "HEAD" and f.get("refuse_head"):
            return 405
        if is_blob_get and f.get("corrupt_blobs") and not headers.get("Range"):
            return "corrupt_body"
        if is_blob_get and f.get("corrupt_ranges") and headers.get("Range"):
            return "corrupt_middle"
        if is_blob_get and f.get("redirect_blobs") and port == self.port:
            return "redirect"
        rng = headers.get("Range", "")
        if is_blob_get and rng and "," in rng and f.get("reject_multirange"):
            return "reject_multirange"
        if is_blob_get and rng and f.get("ignore_range"):
            return "ignore_range"
        if is_blob_get and f.get("drop_body", 0) > 0 and not rng:
            f["drop_body"] -= 1
            return "drop_body"
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.redirect_server.shutdown()


class EvilServer:
    """Another host (127.0.0.1, its own port: another origin) that answers what a test says and records
    every request it gets, headers included: a storage host a registry redirects to, a token realm, or a
    whole registry. `answer(method, path, headers) -> (status, headers, body)`; `tls`: (cert, key)."""

    def __init__(self, answer, tls: tuple[str, str] | None = None):
        self.answer = answer
        self.requests: list[tuple[str, str, dict]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = server.answer(self.command, self.path, self.headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if not any(k.lower() == "content-length" for k in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorizations(self) -> list[str]:
        return [v for _, _, h in self.requests for k, v in h.items() if k.lower() == "authorization"]

    def stop(self) -> None:
        self.server.shutdown()
