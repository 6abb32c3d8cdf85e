"""Which TLS a registry gets: the CAs trusted for a host, and whether a loopback port speaks TLS at all."""

from __future__ import annotations

import functools
import os
import socket
import ssl


@functools.lru_cache(maxsize=1)
def system_tls_context() -> ssl.SSLContext:
    """The system CA store, loaded once per process and shared by every registry client without a CA of
    its own (loading it costs ~15 ms; a snapshotter calls this at start so no Prepare pays for it)."""
    return ssl.create_default_context()


def ssl_context(host: str, certs_dir: str | None) -> ssl.SSLContext:
    """System CAs plus Docker's per-registry CA (`/etc/docker/certs.d/HOST/ca.crt`, or `*.crt` there)."""
    directory = os.path.join(certs_dir or os.environ.get("LAZYBUILD_CERTS_DIR", "/etc/docker/certs.d"), host)
    crts = sorted(n for n in os.listdir(directory) if n.endswith(".crt")) if os.path.isdir(directory) else []
    if not crts:
        return system_tls_context()
    ctx = ssl.create_default_context()
    for name in crts:
        ctx.load_verify_locations(os.path.join(directory, name))
    return ctx


def speaks_tls(host: str, timeout_s: float) -> bool:
    """Loopback registries may be plain HTTP (as Docker allows) or TLS: ask the port which, with a bare
    TLS handshake (a plain HTTP server answers it with an HTTP error, which fails the handshake)."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name or not port.isdigit():
        name, port = host, "443"
    name = name.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Only the question "does this port speak TLS" is asked here; nothing is sent over this socket.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((name, int(port)), timeout=min(timeout_s, 5.0)) as sock:
            with ctx.wrap_socket(sock, server_hostname=name):
                return True
    except (OSError, ssl.SSLError):
        return False
