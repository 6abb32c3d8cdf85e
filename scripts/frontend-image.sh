#!/usr/bin/env bash
# Build the lazybuild frontend image and optionally push it:
#   scripts/frontend-image.sh TAG [--python-image IMAGE] [--push]
# Wheels are made on the host (pip wheel) and installed in the image with --no-index.
# Needs DOCKER_HOST (or the default socket) pointing at a Docker 20.10+ daemon with BuildKit.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:?usage: frontend-image.sh TAG [--python-image IMAGE] [--push]}; shift
python_image=""; push=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python-image) python_image=$2; shift 2 ;;
    --push) push=1; shift ;;
    *) echo "frontend-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
docker=${DOCKER:-/usr/bin/docker}
wheels=$here/dist/frontend-wheels
# One build at a time per checkout: the wheels directory is shared (tests and benches may run together).
mkdir -p "$here/dist"
exec 9>"$here/dist/.frontend-image.lock"
flock 9
rm -rf "$wheels.partial" && mkdir -p "$wheels.partial"
python3 -m pip wheel -q --disable-pip-version-check "$here" -w "$wheels.partial"
rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
args=(build --network=host -t "$tag")
[ -n "$python_image" ] && args+=(--build-arg "PYTHON_IMAGE=$python_image")
[ -t 2 ] || args+=(--progress=plain)
DOCKER_BUILDKIT=1 "$docker" "${args[@]}" "$here"
[ -n "$push" ] && "$docker" push "$tag"
echo "frontend image: $tag"
