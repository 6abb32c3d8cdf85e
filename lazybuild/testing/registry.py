"""A real registry on loopback: Debian's docker-registry (distribution v2) on 127.0.0.1, plain HTTP, TLS
(`make_tls`: a self-signed certificate, as openssl makes it) + htpasswd basic auth (`make_htpasswd`), or
token auth (the `token` section of its configuration), with filesystem storage in a directory of its own."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time

from lazybuild.testing.procs import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class RegistryProcess:
    """docker-registry serve CONFIG, filesystem storage in `workdir`; `host` is 127.0.0.1:PORT.

    tls: (certificate, key) files; htpasswd: a file from `make_htpasswd`; token: the registry's
    `auth.token` settings (realm, service, issuer, rootcertbundle)."""

    def __init__(self, workdir: str, *, tls: tuple[str, str] | None = None, htpasswd: str | None = None,
                 token: dict | None = None):
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        lines = ["version: 0.1", "log:", "  level: error", "storage:", "  filesystem:",
                 f"    rootdirectory: {workdir}/data", "  delete:", "    enabled: true", "http:",
                 f"  addr: 127.0.0.1:{self.port}"]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: lazybuild-test", f"    path: {htpasswd}"]
        if token:
            lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in token.items()]
        config = os.path.join(workdir, "config.yml")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log = open(os.path.join(workdir, "registry.log"), "w")
        self.proc = subprocess.Popen(["docker-registry", "serve", config], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.log.close()


def make_tls(workdir: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (IP SAN), as `openssl` makes it: (certificate, key)."""
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def make_htpasswd(workdir: str, user: str, password: str) -> str:
    """An htpasswd file (bcrypt, `htpasswd -B`) with one user."""
    path = os.path.join(workdir, "htpasswd")
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
    with open(path, "w") as f:
        f.write(out)
    return path


def docker_config(workdir: str, host: str, user: str, password: str) -> str:
    """A DOCKER_CONFIG directory with `auths` for host, as `docker login` writes it."""
    d = os.path.join(workdir, "docker-config")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}, f)
    return d
