#!/usr/bin/env bash
# Set up a fresh machine (Debian bookworm, root) for lazybuild: system packages, the Python package
# with its test extras, and the reference eStargz checker. Idempotent: reruns reuse what is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${LAZYBUILD_SHARED:-$here/../shared}

# System packages: zstd/tar/attr for test fixtures; docker-registry, openssl, htpasswd, skopeo and umoci for the
# registry tests; fuse3 + libfuse3-dev + pkg-config for pyfuse3 (the mounter); debootstrap for the Debian test
# image; Go + the upstream estargz library for the oracle; docker.io (dockerd 20.10 with BuildKit v0.8)
# for the frontend tests, which start their own daemon, plus git, curl and ssh-agent for their sources;
# containerd 1.6 + runc for the snapshotter tests (which also build ctr-remote from the same Go source),
# iptables + iproute2 for the slow-link benches; bash and zsh for the completion tests; BuildKit's control
# API packages as Debian ships them for the test client that asks for entitlements (tests/support/buildkit_solve).
pkgs="zstd tar attr openssl apache2-utils docker-registry skopeo umoci fuse3 libfuse3-dev pkg-config debootstrap golang-go golang-github-containerd-stargz-snapshotter-dev docker.io containerd runc git curl openssh-client iptables iproute2 bash zsh golang-github-docker-docker-dev golang-github-gofrs-flock-dev golang-github-google-shlex-dev golang-github-tonistiigi-fsutil-dev golang-github-grpc-ecosystem-grpc-opentracing-dev"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  apt-get update -qq
  # Packages must not start their services (a system dockerd would bring up the 172.17/16 bridge):
  # the tests start dockerd themselves with --bridge=none and their own roots.
  policy=/usr/sbin/policy-rc.d; made_policy=""
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  if [ -n "$made_policy" ]; then rm -f "$policy"; fi
fi

# The Python package, editable, with the test extras.
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -e "$here[test,mount]"

# The reference checker (upstream estargz v0.12 from Debian), rebuilt only when its source changes.
oracle=/usr/local/bin/estargz-oracle
stamp=/var/cache/lazybuild/estargz-oracle.sha256
want=$(sha256sum "$shared/tools/estargz-oracle/main.go" | cut -d' ' -f1)
if [ ! -x "$oracle" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  mkdir -p /var/cache/lazybuild
  bash "$shared/tools/estargz-oracle/build.sh" "$oracle"
  echo "$want" > "$stamp"
fi
# The reference client ctr-remote (and stargz-snapshotter, nfqdelay for bench/snapshotter.py), built from
# Debian's stargz-snapshotter source by the anchor script; kept in the test cache between runs.
anchor_bin=${LAZYBUILD_TEST_CACHE:-/var/cache/lazybuild-test}/anchor-bin
if [ ! -x "$anchor_bin/ctr-remote" ] || [ ! -x "$anchor_bin/stargz-snapshotter" ]; then
  mkdir -p "$anchor_bin"
  BIN=$anchor_bin A=$(mktemp -d) bash "$shared/tools/stargz-anchor/anchor-bench.sh" build
fi
echo "setup: ready ($(lazybuild --version), $oracle)"
