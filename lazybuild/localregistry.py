"""One image of a local OCI layout, served read-only as a registry on loopback, so that what reads images
lazily from registries (the mounter: `lazybuild mount`, `lazybuild optimize`) reads local layouts and archives
through the same engine: ranged reads, chunk verification against the TOC, the TOC against the manifest.

Only the chosen manifest and the blobs it names are served, under a repository name made of random bytes
(another local user cannot guess it), on 127.0.0.1 with an ephemeral port, with GET/HEAD only. The
manifest was read from the layout with its digest checked; blobs are served as they are on disk, and
their readers check them (a chunk against its TOC digest, a whole blob against its digest).
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .image import Manifest
from .layout import OCILayout

_RANGE_RE = re.compile(r"(\d*)-(\d*)")
MAX_RANGES = 256  # a Range header with more parts than any reader of ours asks for is refused (416)
COPY_BLOCK = 1 << 20


class LocalRegistry:
    """`with LocalRegistry(layout, manifest) as reg: reg.reference` -> `127.0.0.1:PORT/local/<random>@<digest>`."""

    def __init__(self, layout: OCILayout, manifest: Manifest):
        self.layout, self.manifest = layout, manifest
        self.repository = "local/" + secrets.token_hex(12)
        self.blobs = {manifest.config.digest, *(d.digest for d in manifest.layers)}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="lazybuild-local-registry", daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repository}@{self.manifest.digest}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _handler(registry: LocalRegistry):
    prefix = f"/v2/{registry.repository}/"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass  # the clients log what matters

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _plain(self, status: int, body: bytes = b"", ctype: str = "application/json", send: bool = True,
                   headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if send and body:
                self.wfile.write(body)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/v2/", "/v2"):
                return self._plain(200, b"{}", send=body)
            if not path.startswith(prefix):
                return self._plain(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', send=body)
            kind, _, name = path[len(prefix):].partition("/")
            m = registry.manifest
            if kind == "manifests" and name in (m.digest, "latest"):
                return self._plain(200, m.raw, m.media_type, body, {"Docker-Content-Digest": m.digest})
            if kind == "blobs" and name in registry.blobs:
                return self._blob(name, body)
            return self._plain(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', send=body)

        def _blob(self, digest: str, body: bool) -> None:
            with registry.layout.open_blob(digest) as f:  # a regular file of the layout, no symlink followed
                size = os.fstat(f.fileno()).st_size
                ranges = _parse_ranges(self.headers.get("Range", ""), size)
                if ranges is None:
                    return self._plain(416, headers={"Content-Range": f"bytes */{size}"}, send=body)
                extra = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
                if not ranges:
                    self._plain_head(200, size, "application/octet-stream", extra)
                    if body:
                        _send(f, self.wfile, 0, size)
                    return
                if len(ranges) == 1:
                    a, b = ranges[0]
                    self._plain_head(206, b - a, "application/octet-stream",
                                     {**extra, "Content-Range": f"bytes {a}-{b - 1}/{size}"})
                    if body:
                        _send(f, self.wfile, a, b)
                    return
                boundary = secrets.token_hex(16)
                heads = [(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                          f"Content-Range: bytes {a}-{b - 1}/{size}\r\n\r\n").encode() for a, b in ranges]
                tail = f"--{boundary}--\r\n".encode()
                length = sum(len(h) + (b - a) + 2 for h, (a, b) in zip(heads, ranges)) + len(tail)
                self._plain_head(206, length, f"multipart/byteranges; boundary={boundary}", extra)
                if body:
                    for head, (a, b) in zip(heads, ranges):
                        self.wfile.write(head)
                        _send(f, self.wfile, a, b)
                        self.wfile.write(b"\r\n")
                    self.wfile.write(tail)

        def _plain_head(self, status: int, length: int, ctype: str, headers: dict) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()

    return Handler


def _parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """[] for no Range (the whole blob), the [start, end) ranges asked for, or None when they cannot be served."""
    if not header:
        return []
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes":
        return []  # a unit we do not know: the whole blob, as RFC 9110 allows
    parts = spec.split(",")
    if len(parts) > MAX_RANGES:
        return None
    out = []
    for part in parts:
        m = _RANGE_RE.fullmatch(part.strip())
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if not m.group(1):  # a suffix: the last N bytes
            n = int(m.group(2))
            a, b = max(0, size - n), size
        else:
            a = int(m.group(1))
            b = min(size, int(m.group(2)) + 1) if m.group(2) else size
        if a >= size or b <= a:
            return None
        out.append((a, b))
    return out


def _send(f, out, start: int, end: int) -> None:
    pos = start
    while pos < end:
        data = os.pread(f.fileno(), min(COPY_BLOCK, end - pos), pos)
        if not data:
            break  # the file shrank under us: the client sees a short body and its checks fail
        out.write(data)
        pos += len(data)


__all__ = ["LocalRegistry"]
