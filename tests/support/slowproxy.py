"""A proxy in front of a registry that is slow or faulty in the ways a lazy mount of many small files
meets on a real link, and counts what it is asked: every request is recorded with its connection (the
client's port), its Range header and the status it got.

    SlowProxy(upstream, delay_s=0.3)          every blob answer is held back delay_s (latency, not bandwidth)
    SlowProxy(upstream, fail_every=3)         every third request is answered 503
    SlowProxy(upstream, reject_multirange=True)  multi-range blob requests are answered 400
    SlowProxy(upstream, drop_every=2)         every second blob answer is cut off halfway, its connection closed

The faults of support.registry.FaultProxy are one-shot and set per test; these are steady, as a bad
link or a CDN that does not do multi-range is."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from dataclasses import dataclass

from lazybuild.testing.registry import free_port


@dataclass
class Seen:
    """One request the proxy got."""
    client_port: int  # which connection it came on
    method: str
    path: str
    range: str
    status: int

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path

    @property
    def ranges(self) -> int:
        return self.range.count(",") + 1 if self.range else 0


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class SlowProxy:
    def __init__(self, upstream: str, *, delay_s: float = 0.0, fail_every: int = 0, reject_multirange: bool = False,
                 drop_every: int = 0):
        self.upstream = upstream
        self.delay_s, self.fail_every, self.reject_multirange = delay_s, fail_every, reject_multirange
        self.drop_every = drop_every
        self.dropped = 0
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.blob_bytes_sent = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client's connection reuse is what is tested

            def log_message(self, *a):
                pass

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, method: str) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                rng = self.headers.get("Range", "")
                blob_get = method == "GET" and "/blobs/sha256:" in self.path
                with proxy.lock:
                    n = len(proxy.seen) + 1
                    seen = Seen(self.client_address[1], method, self.path, rng, 0)
                    proxy.seen.append(seen)
                if proxy.fail_every and n % proxy.fail_every == 0:
                    seen.status = 503
                    self._answer(503, [("Content-Type", "text/plain")], b"backend unavailable\n", method)
                    return
                if blob_get and proxy.reject_multirange and "," in rng:
                    seen.status = 400
                    self._answer(400, [("Content-Type", "text/plain")], b"multiple ranges not supported\n", method)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                finally:
                    conn.close()
                if blob_get and proxy.delay_s:
                    time.sleep(proxy.delay_s)
                seen.status = r.status
                if blob_get and proxy.drop_every:
                    with proxy.lock:
                        blob_n = sum(1 for s in proxy.seen if s.is_blob_get)
                    if blob_n % proxy.drop_every == 0 and len(data) > 1:
                        with proxy.lock:
                            proxy.dropped += 1
                        self.send_response(r.status)
                        for k, v in r.getheaders():
                            if k.lower() not in ("transfer-encoding", "connection"):
                                self.send_header(k, v)
                        self.end_headers()
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                out = [(k, v.replace(f"http://{proxy.upstream}", f"http://127.0.0.1:{self.server.server_port}"))
                       for k, v in r.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                self._answer(r.status, out, data, method)
                if blob_get:
                    with proxy.lock:
                        proxy.blob_bytes_sent += len(data)

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

        self.server = _Server(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_port
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def blob_gets(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.is_blob_get]

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.blob_bytes_sent = 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
