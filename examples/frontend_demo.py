#!/usr/bin/env python3
"""The BuildKit frontend end to end: a Docker 20.10 daemon and a registry of its own, the frontend image
built and pushed, then a Dockerfile whose first line is `# syntax=<registry>/lazybuild:demo` built with
`DOCKER_BUILDKIT=1 docker build` and run. Everything it starts is stopped at the end."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from lazybuild.testing.dockerd import BASE_IMAGE, push_frontend_image, start_with_base
from lazybuild.testing.registry import RegistryProcess

DOCKERFILE = """# syntax={frontend}
FROM {base} AS build
WORKDIR /src
COPY greet.py .
RUN --mount=type=cache,target=/root/.cache <<EOF
set -e
python3 -m py_compile greet.py
echo "built on $(uname -m)" > /src/build-info
EOF

FROM {base}
COPY --from=build /src/ /app/
COPY <<EOF /app/message
Hello from a Dockerfile built by the lazybuild frontend.
EOF
ENV GREETING_FILE=/app/message
ENTRYPOINT ["python3", "/app/greet.py"]
"""

GREET = """import os
print(open(os.environ["GREETING_FILE"]).read().strip())
print(open("/app/build-info").read().strip())
"""


def main() -> int:
    work = tempfile.mkdtemp(prefix="lazybuild-frontend-demo-")
    registry = RegistryProcess(os.path.join(work, "registry"))
    print(f"== a Docker daemon of our own (BuildKit v0.8) and a registry at {registry.host}", flush=True)
    dockerd = start_with_base(os.path.join(work, "dockerd"))
    try:
        ref = f"{registry.host}/lazybuild:demo"
        print(f"== building the frontend image from ./Dockerfile and pushing it as {ref}", flush=True)
        push_frontend_image(dockerd, ref)
        ctx = os.path.join(work, "context")
        os.makedirs(ctx)
        text = DOCKERFILE.format(frontend=ref, base=BASE_IMAGE)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(text)
        with open(os.path.join(ctx, "greet.py"), "w") as f:
            f.write(GREET)
        print("== the Dockerfile:\n" + text, flush=True)
        print("== DOCKER_BUILDKIT=1 docker build --network=host -t lazybuild-demo .", flush=True)
        p = dockerd.build(ctx, "-t", "lazybuild-demo", check=False)
        sys.stderr.write(p.stderr.decode(errors="replace"))
        if p.returncode != 0:
            return 1
        print("== docker run --rm lazybuild-demo", flush=True)
        sys.stdout.write(dockerd.docker("run", "--rm", "lazybuild-demo").stdout.decode())
        return 0
    finally:
        dockerd.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
