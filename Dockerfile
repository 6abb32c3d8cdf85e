# The lazybuild BuildKit frontend image: a Dockerfile whose first line is
# `# syntax=REGISTRY/lazybuild` is built by this image's ENTRYPOINT.
#
# Built by scripts/frontend-image.sh, which first makes the wheels on the host (`pip wheel`): inside a
# build there may be no route (or no trusted CA) to a package index, so nothing is downloaded here.
# PYTHON_IMAGE may be any Debian bookworm image with python3 and python3-venv. Of lazybuild's dependencies
# the frontend needs protobuf (it speaks gRPC itself, frontend/wire.py), its in-build exporter
# (LAZYBUILD_OUTPUT=stargz) zlib-ng, zstandard and httpx (to fetch a base image's layers); grpcio and
# tqdm stay out, and so do pip and setuptools (whose .pth file would run at every interpreter start).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
RUN --mount=type=bind,source=dist/frontend-wheels,target=/wheels \
    python3 -m venv /opt/lazybuild \
 && /opt/lazybuild/bin/python3 -m pip install --quiet --no-index --no-compile --find-links /wheels --no-deps lazybuild \
 && /opt/lazybuild/bin/python3 -m pip install --quiet --no-index --no-compile --find-links /wheels protobuf zlib-ng zstandard httpx \
 && /opt/lazybuild/bin/python3 -m pip uninstall --quiet --yes setuptools pip \
 && /opt/lazybuild/bin/python3 -m compileall -q /opt/lazybuild/lib >/dev/null
LABEL moby.buildkit.frontend.network.none="true" \
      moby.buildkit.frontend.caps="moby.buildkit.frontend.inputs,moby.buildkit.frontend.subrequests,moby.buildkit.frontend.contexts"
# BuildKit runs the ENTRYPOINT (CMD is ignored) with no default PATH: the interpreter path is absolute.
# -I: no PYTHON* variables, no user site, and no import from the working directory (`-m` would put it first).
ENTRYPOINT ["/opt/lazybuild/bin/python3", "-I", "-m", "lazybuild.frontend"]
