"""`buildkit-solve` (main.go beside this file): builds on the test dockerd through BuildKit's control API,
which lets a test ask for the security.insecure entitlement (the classic `docker build` cannot). Built
once from Debian's Go packages, as tools/estargz-oracle is, and kept by the hash of its source."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

from lazybuild.testing.images import CACHE

HERE = os.path.dirname(os.path.abspath(__file__))
# main.go imports BuildKit's control API and session packages (vendored in golang-github-docker-docker-dev);
# the others are what those import that Debian packages apart. scripts/setup.sh installs them.
PACKAGES = ["golang-go", "golang-github-docker-docker-dev", "golang-github-gofrs-flock-dev",
            "golang-github-google-shlex-dev", "golang-github-tonistiigi-fsutil-dev",
            "golang-github-grpc-ecosystem-grpc-opentracing-dev"]


def tool() -> str:
    """The path of the built tool (built on first use)."""
    with open(os.path.join(HERE, "main.go"), "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(CACHE, f"buildkit-solve-{key}")
    if os.path.exists(out):
        return out
    if subprocess.run(["dpkg", "-s", *PACKAGES], capture_output=True).returncode != 0:
        raise RuntimeError(f"building buildkit-solve needs {' '.join(PACKAGES)}: run scripts/setup.sh")
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix="buildkit-solve-")
    try:
        shutil.copy(os.path.join(HERE, "main.go"), work)
        env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off", GOFLAGS="",
                   GOCACHE=os.path.join(CACHE, "go-build"))
        p = subprocess.run(["go", "build", "-o", out + ".partial", "."], cwd=work, env=env, capture_output=True)
        if p.returncode != 0:
            raise RuntimeError("building buildkit-solve failed:\n" + p.stderr.decode(errors="replace")[-4000:])
        os.replace(out + ".partial", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def solve(dockerd, frontend: str, context: str, output: str, *, filename: str = "Dockerfile",
          build_args: dict[str, str] | None = None, allow: tuple[str, ...] = (),
          timeout: float = 900) -> subprocess.CompletedProcess:
    """Build CONTEXT on DOCKERD with the frontend image FRONTEND (as `# syntax=` would), asking for the
    entitlements in ALLOW; the result goes to the directory OUTPUT (local exporter). Steps run on the host
    network, as the harness's `docker build --network=host` does (the test daemon has no bridge)."""
    args = [tool(), "-sock", dockerd.socket, "-frontend", frontend, "-context", context, "-file", filename,
            "-output", output, "-opt", "force-network-mode=host", "-allow", "network.host"]
    for k, v in (build_args or {}).items():
        args += ["-opt", f"build-arg:{k}={v}"]
    for a in allow:
        args += ["-allow", a]
    return subprocess.run(args, capture_output=True, timeout=timeout)
