"""LAZYBUILD_OPTIMIZE on the real v0.8 daemon (Docker 20.10): the export step runs the image's workload on
the built filesystem under fanotify and leads every layer it can reorder with the files the workload
opened, in first-open order; a lazy start of the result then asks the registry less than the same build
without the option. A daemon that does not grant security.insecure gets the frontend's explanation.

The classic `docker build` never asks for security.insecure, so the optimized builds go through
BuildKit's control API (support.buildkit_solve) on a second daemon that grants it."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from lazybuild.exporter.workload import Workload, record
from lazybuild.testing.images import debootstrap_rootfs
from support.buildkit_solve import solve
from support.cli_runner import lazybuild
from support.slowproxy import SlowProxy

WORKLOAD = "cat /app/data/d /app/data/b | wc -c && python3 -c 'import json'"
DOCKERFILE = f"""FROM lazybuild-test/python:bookworm
RUN mkdir -p /app/data && for f in a b c d; do head -c 400000 /dev/urandom > /app/data/$f; done
COPY filler.bin /app/filler.bin
CMD ["/bin/sh", "-c", "{WORKLOAD}"]
"""
LANDMARK = ".prefetch.landmark"


@pytest.fixture(scope="module")
def insecure_dockerd(tmp_path_factory):
    """A second Docker 20.10 daemon, this one granting the security.insecure entitlement."""
    from lazybuild.testing.dockerd import start_with_base

    d = start_with_base(str(tmp_path_factory.mktemp("dockerd-insecure")), insecure_entitlement=True)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    ctx = tmp_path_factory.mktemp("optimize-ctx")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "filler.bin").write_bytes(os.urandom(1 << 20))
    return ctx


def _build(d, frontend, ctx, out, **args):
    p = solve(d, frontend, str(ctx), str(out), build_args={"LAZYBUILD_OUTPUT": "stargz", **args},
              allow=("security.insecure",))
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-4000:]
    return p.stderr.decode(errors="replace")


def _layers(out) -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return manifest["layers"]


def _names(out, layer) -> list[str]:
    """The layer's regular files in blob order (their parent directories go before them, as eStargz needs)."""
    blob = out / "blobs" / "sha256" / layer["digest"].split(":")[1]
    entries = json.loads(lazybuild("layer", "ls", str(blob), "--format", "json").stdout)
    return [e["path"] for e in entries if e["type"] == "reg"]


def _lead(names: list[str]) -> list[str]:
    """The files before the landmark (none when the layer has no prioritized files)."""
    return names[:names.index(LANDMARK)] if LANDMARK in names else []


def test_the_recorder_runs_a_workload_on_a_tree_it_leaves_untouched(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(debootstrap_rootfs(("python3", "python3-venv"))) as tf:
        tf.extractall(root, filter="fully_trusted")
    (root / "app").mkdir()
    for name in "abc":
        (root / "app" / name).write_text(name)
    before = sorted(os.listdir(root))
    w = Workload(("/bin/sh", "-c", "cat /app/c /app/a > /tmp/out && id -u > /tmp/id && sleep 60"),
                 ("PATH=/usr/bin:/bin",), "/app", "nobody", 3)
    paths = record(str(root), w)
    assert paths.index("app/c") < paths.index("app/a") and "app/b" not in paths
    assert "usr/bin/dash" in paths and "usr/bin/cat" in paths  # exec'd binaries, by their real names
    assert "usr/bin/sleep" in paths  # the period ended the workload, not the other way round
    assert sorted(os.listdir(root)) == before and not (root / "tmp" / "out").exists()  # writes went to the tmpfs
    with open("/proc/self/mountinfo") as f:
        assert "lazybuild-workload-" not in f.read()
    # The workload ran as the image's user, in its working directory, with none of the export step's powers.
    w = Workload(("/bin/sh", "-c", "id -u; grep CapBnd /proc/self/status; pwd; ls /dev | tr '\\n' ,"),
                 ("PATH=/usr/bin:/bin",), "/app", "nobody", 10)
    r, wfd = os.pipe()
    saved = os.dup(2)
    os.dup2(wfd, 2)  # the workload's output goes to the build log: stderr
    try:
        record(str(root), w)
    finally:
        os.dup2(saved, 2)
        os.close(wfd)
    out = os.read(r, 65536).decode()
    os.close(r)
    assert out.split()[0] == "65534" and "00000000a00425fb" in out and "/app" in out, out  # default caps less MKNOD
    assert set(out.split()[-1].strip(",").split(",")) == {"fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                                                          "stderr", "stdin", "stdout", "tty", "urandom", "zero"}, out


def test_the_workloads_files_lead_their_layers_and_a_lazy_start_asks_less(insecure_dockerd, frontend_image, registry,
                                                                           oracle, context, tmp_path):
    optimized, plain = tmp_path / "optimized", tmp_path / "plain"
    log = _build(insecure_dockerd, frontend_image, context, optimized, LAZYBUILD_OPTIMIZE="1",
                 LAZYBUILD_OPTIMIZE_PERIOD="30")
    assert "optimize: running" in log, log[-3000:]
    _build(insecure_dockerd, frontend_image, context, plain)
    layers = _layers(optimized)
    assert len(layers) == 3  # the base as one layer, the RUN, the COPY
    for layer in layers:
        blob = optimized / "blobs" / "sha256" / layer["digest"].split(":")[1]
        toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        subprocess.run([oracle, "verify", "-toc", toc, str(blob)], check=True, capture_output=True)
    base, data, filler = (_names(optimized, layer) for layer in layers)
    assert _lead(data) == ["app/data/d", "app/data/b"]  # in the order the workload opened them
    assert "app/data/a" in data and "app/data/c" in data
    lead = _lead(base)
    print("base layer led by", len(lead), "files:", lead)
    json_module = [p for p in lead if p.startswith("usr/lib/python3.11/json/")]  # its .pyc: Debian compiles them
    assert lead[0] == "usr/bin/dash" and json_module, lead
    assert lead.index("usr/bin/cat") < lead.index("usr/bin/python3.11") < lead.index(json_module[0])
    assert not any(p.startswith("app/") for p in lead)  # each file leads only the layer a mount reads it from
    assert _lead(filler) == []  # nothing the workload read: no prioritized files, no landmark
    assert all(_lead(_names(plain, layer)) == [] for layer in _layers(plain))

    # A lazy start of each: mount it from the registry through a counting proxy and run the workload.
    asked = {}
    for name, out in (("optimized", optimized), ("plain", plain)):
        ref = f"{registry.host}/stargz-optimize/app:{name}"
        lazybuild("push", f"oci:{out}", ref)
        proxy = SlowProxy(registry.host)
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        try:
            lazybuild("mount", "--daemon", ref.replace(registry.host, proxy.host), str(mnt),
                      "--cache", str(tmp_path / f"cache-{name}"), "--no-background-fetch")
            try:
                p = subprocess.run(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD], capture_output=True, timeout=300)
                assert p.returncode == 0, p.stderr
                status = json.loads(lazybuild("mount", "--status", "--format", "json", str(mnt)).stdout)
            finally:
                lazybuild("umount", str(mnt))
            gets = [s for s in proxy.seen if s.is_blob_get]
            asked[name] = {"requests": len(gets), "bytes": proxy.blob_bytes_sent,
                           "fetched": sum(layer["fetchedBytes"] for layer in status["layers"])}
        finally:
            proxy.stop()
    print("lazy start:", json.dumps(asked))
    assert asked["optimized"]["requests"] < asked["plain"]["requests"], asked
    assert asked["optimized"]["bytes"] < asked["plain"]["bytes"], asked


def test_optimize_cmd_names_the_workload(insecure_dockerd, frontend_image, context, tmp_path):
    out = tmp_path / "out"
    _build(insecure_dockerd, frontend_image, context, out, LAZYBUILD_OPTIMIZE_CMD='["cat", "/app/data/c", "/app/filler.bin"]',
           LAZYBUILD_OPTIMIZE_PERIOD="20")
    base, data, filler = (_names(out, layer) for layer in _layers(out))
    assert _lead(data) == ["app/data/c"] and _lead(filler) == ["app/filler.bin"]
    assert _lead(base)[0] == "usr/bin/cat" and "usr/bin/python3.11" not in _lead(base)


def test_without_the_entitlement_the_build_says_what_to_allow(dockerd, insecure_dockerd, frontend_image, context,
                                                              tmp_path):
    args = {"LAZYBUILD_OUTPUT": "stargz", "LAZYBUILD_OPTIMIZE": "1"}
    # The classic `docker build` never asks for security.insecure: the frontend explains.
    (context / "Dockerfile.syntax").write_text(f"# syntax={frontend_image}\n" + DOCKERFILE)
    p = dockerd.build(str(context), "-f", str(context / "Dockerfile.syntax"), "--build-arg", "LAZYBUILD_OUTPUT=stargz",
                      "--build-arg", "LAZYBUILD_OPTIMIZE=1", "--output", f"type=local,dest={tmp_path / 'out1'}", check=False)
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 and "needs the security.insecure entitlement" in err and "security-insecure" in err, err[-3000:]
    # A daemon that grants it, and a build that does not ask: the same.
    p = solve(insecure_dockerd, frontend_image, str(context), str(tmp_path / "out2"), build_args=args)
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 and "needs the security.insecure entitlement" in err, err[-3000:]
    # A build that asks a daemon that does not grant it: the daemon refuses the build before it starts.
    p = solve(dockerd, frontend_image, str(context), str(tmp_path / "out3"), build_args=args, allow=("security.insecure",))
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 and "security.insecure is not allowed" in err, err[-3000:]
