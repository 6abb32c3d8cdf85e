#!/usr/bin/env bash
# The BuildKit frontend demo: `# syntax=<local registry>/lazybuild:demo` with Docker 20.10's BuildKit.
# Run `bash scripts/setup.sh` first (docker.io, docker-registry, debootstrap).
set -euo pipefail
exec python3 "$(dirname "$0")/frontend_demo.py"
