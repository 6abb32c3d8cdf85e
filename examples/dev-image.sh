#!/usr/bin/env bash
# The main job end to end: a lazy "dev image" build (see examples/dev_image.py).
# Run `bash scripts/setup.sh` first.
set -euo pipefail
exec python3 "$(dirname "$0")/dev_image.py"
