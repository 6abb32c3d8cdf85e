"""`lazybuild build` (no daemon: runc on overlayfs over lazily mounted eStargz bases) against BuildKit.

The Dockerfiles of tests/data/frontend_corpus are built by lazybuild build from the Debian test image pushed
to a local registry as eStargz, and by Docker 20.10's BuildKit from the same image: the image configs
and the flattened final filesystems must be equal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from support import CORPUS
from support.cli_runner import lazybuild
from support.flatten import flatten_docker_save, flatten_oci_tar
from support.registry import FaultProxy
from test_frontend import CONFIG_FIELDS

BASE = "lazybuild-test/python:bookworm"
# Cases whose features lazybuild build does not have yet (see the README): none of the corpus today.
UNSUPPORTED: dict[str, str] = {}


@pytest.fixture(scope="session")
def lazy_base(dockerd, registry, tmp_path_factory) -> str:
    """The Debian test base image in the registry as eStargz (what lazybuild build mounts lazily)."""
    d = tmp_path_factory.mktemp("lazy-base")
    saved = str(d / "base.tar")
    with open(saved, "wb") as f:
        subprocess.run(["/usr/bin/docker", "save", BASE], stdout=f, env=dockerd.env(), check=True)
    ref = f"{registry.host}/{BASE}"
    lazybuild("convert", f"docker-archive:{saved}", ref)
    return ref


def lazy_build(context, *args, check=True):
    p = subprocess.run(["lazybuild", "build", "--progress", "plain", *args, str(context)], capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"lazybuild build failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


@pytest.mark.parametrize("case", sorted(os.listdir(CORPUS)))
def test_same_image_as_buildkit(dockerd, lazy_base, case, tmp_path):
    if case in UNSUPPORTED:
        pytest.fail(f"{case}: {UNSUPPORTED[case]}")
    src = os.path.join(CORPUS, case)
    ctx = tmp_path / "ctx"
    shutil.copytree(src, ctx, symlinks=True)
    meta = json.load(open(os.path.join(src, "case.json"))) if os.path.exists(os.path.join(src, "case.json")) else {}
    args = [a.replace("{case}", str(ctx)) for a in meta.get("args", [])]
    text = (ctx / "Dockerfile").read_text().replace(BASE, lazy_base)
    (ctx / "Dockerfile.lazy").write_text(text)
    out = tmp_path / "image.tar"
    lazy_build(ctx, "-f", str(ctx / "Dockerfile.lazy"), "--output", f"type=oci,dest={out}", *args)
    builtin = "Dockerfile.builtin" if (ctx / "Dockerfile.builtin").exists() else "Dockerfile"
    tag = f"build-{case}"
    dockerd.build(str(ctx), "-f", str(ctx / builtin), "-t", tag, *args)
    saved = tmp_path / "saved.tar"
    with open(saved, "wb") as f:
        subprocess.run(["/usr/bin/docker", "save", tag], stdout=f, env=dockerd.env(), check=True)
    ours_cfg, ours_fs = flatten_oci_tar(str(out))
    theirs_cfg, theirs_fs = flatten_docker_save(str(saved))
    for key in CONFIG_FIELDS:
        assert ours_cfg["config"].get(key) == theirs_cfg["config"].get(key), f"config {key} differs"
    for stub in meta.get("mountStubs", []):  # see mountStubsNote: v0.8 keeps empty mount targets
        assert theirs_fs.get(stub, (b"5",))[0] == b"5", f"{stub} is not a directory stub in BuildKit's image"
        theirs_fs.pop(stub, None)
    only_a, only_b = sorted(set(ours_fs) - set(theirs_fs)), sorted(set(theirs_fs) - set(ours_fs))
    changed = sorted(p for p in set(ours_fs) & set(theirs_fs) if ours_fs[p] != theirs_fs[p])
    assert not (only_a or only_b or changed), (
        f"filesystems differ: only ours {only_a[:20]}, only BuildKit {only_b[:20]}, "
        f"changed {[(p, ours_fs[p], theirs_fs[p]) for p in changed[:20]]}")


def _leftovers() -> tuple[str, str]:
    mounts = "".join(line for line in open("/proc/mounts") if "/run/lazybuild/b/" in line)
    containers = subprocess.run(["runc", "--root", "/run/lazybuild/runc", "list", "-q"], capture_output=True,
                                text=True).stdout
    return mounts, containers.strip()


def test_push_cache_and_lazy_mount_of_the_result(lazy_base, registry, oracle, tmp_path):
    """A pushed build mounts lazily, its layers pass the reference's verify; a second build is cached
    (and --no-cache runs again); only the new layers are uploaded, the base is mounted cross-repository."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.c").write_text("int main(void) { return 0; }\n")
    (ctx / "Dockerfile").write_text(f"FROM {lazy_base} AS dev\nCOPY hello.c /src/\nRUN cp /src/hello.c /src/copy.c\n"
                                    "FROM scratch\nCOPY --from=dev /src/copy.c /copy.c\n"
                                    f"FROM {lazy_base}\nCOPY --from=1 /copy.c /out/copy.c\nCMD [\"cat\", \"/out/copy.c\"]\n")
    ref = f"{registry.host}/built/app:1"
    first = lazy_build(ctx, "-t", ref, "--output", "type=stargz,push=true")
    assert "mounted" in first.stderr and "fetched lazily" in first.stderr
    second = lazy_build(ctx, "-t", ref, "--output", "type=stargz,push=true")
    assert second.stderr.count("(cached)") == 4  # every step of the three stages
    third = lazy_build(ctx, "--no-cache")
    assert "(cached)" not in third.stderr
    info = json.loads(lazybuild("inspect", "--format", "json", ref).stdout)
    assert info["config"]["config"]["Cmd"] == ["cat", "/out/copy.c"]
    for layer in info["manifest"]["layers"][1:]:  # ours; the first is the base
        blob = tmp_path / "blob"
        subprocess.run(["lazybuild", "pull", ref, f"oci:{tmp_path / 'layout'}"], check=True, capture_output=True)
        blob = tmp_path / "layout" / "blobs" / "sha256" / layer["digest"].split(":")[1]
        toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        subprocess.run([oracle, "verify", "-toc", toc, str(blob)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazybuild("mount", "--daemon", ref, str(mnt), "--cache", str(tmp_path / "cache"))
    try:
        assert (mnt / "out" / "copy.c").read_text() == "int main(void) { return 0; }\n"
    finally:
        lazybuild("umount", str(mnt))


def test_cached_rebuild_mounts_nothing_and_timings_say_where_time_went(lazy_base, registry, tmp_path):
    """A rebuild whose steps are all cached answers from the step cache: the base is resolved (its tag
    may have moved) but never mounted, so no layer byte is read, and its OCI output copies the base's
    layers from the state dir, where the first export kept them. A changed source mounts it again.
    --debug-timings splits the build into resolve, mount (and the mount's own phases), steps, export."""
    proxy = FaultProxy(registry.host)
    try:
        base = lazy_base.replace(registry.host, proxy.host)
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "msg").write_text("one\n")
        (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY msg /msg\nRUN cat /msg > /copy\n")
        state = ["--state-dir", str(tmp_path / "state"), "--cache", str(tmp_path / "cache")]
        out = ["--output", f"type=oci,dest={tmp_path / 'image.tar'}"]
        first = lazy_build(ctx, *state, *out, "--debug-timings")
        phases = [line for line in first.stderr.splitlines() if line.startswith("timings: ")]
        for want in ("resolve ", "mount ", ": open layers", "RUN cat /msg > /copy: RunStep", "export", "teardown"):
            assert any(want in line for line in phases), f"no {want!r} phase in:\n" + "\n".join(phases)

        layer_digests = {d["digest"] for d in json.loads(lazybuild("inspect", "--format", "json", lazy_base).stdout)["manifest"]["layers"]}

        def layer_reads() -> list[str]:  # ranged: the mount's (the OCI output fetches kept layers whole)
            return [path for _, method, path, headers in proxy.requests if method == "GET" and "Range" in headers
                    and any(path.endswith("/blobs/" + d) for d in layer_digests)]

        def whole_layer_gets() -> list[str]:  # the OCI output's copies of the base's layers
            return [path for _, method, path, headers in proxy.requests if method == "GET" and "Range" not in headers
                    and any(path.endswith("/blobs/" + d) for d in layer_digests)]

        assert layer_reads()  # the first build read the base lazily
        assert len(whole_layer_gets()) == len(layer_digests)  # and its output fetched the base's layers
        proxy.requests.clear()
        second = lazy_build(ctx, *state, *out, "--debug-timings")
        assert second.stderr.count("(cached)") == 2
        assert layer_reads() == [] and not any(line.startswith("timings: ") and " mount " in line
                                               for line in second.stderr.splitlines())
        assert whole_layer_gets() == []  # kept in the state dir by the first build's export
        assert any("/manifests/" in path for _, _, path, _ in proxy.requests)  # the tag is still resolved
        assert _leftovers() == ("", "")
        (ctx / "msg").write_text("two\n")
        third = lazy_build(ctx, *state, *out)
        assert third.stderr.count("(cached)") == 0 and "RUN cat /msg" in third.stderr
        _, fs = flatten_oci_tar(str(tmp_path / "image.tar"))
        assert fs["copy"][-1] == hashlib.sha256(b"two\n").hexdigest()
    finally:
        proxy.stop()


def test_failing_run_reports_and_leaves_nothing_behind(lazy_base, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {lazy_base}\nRUN echo first line && echo second line && exit 3\n")
    out = tmp_path / "out.tar"
    p = lazy_build(ctx, "--output", f"type=oci,dest={out}", check=False)
    assert p.returncode == 4  # a failed step (lazybuild.errors.BuildFailure)
    assert "line 2: RUN" in p.stderr and "exit code 3" in p.stderr and "second line" in p.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tar*"))
    assert _leftovers() == ("", "")


def test_interrupt_leaves_nothing_behind(lazy_base, tmp_path):
    import signal
    import time

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {lazy_base}\nRUN echo started && sleep 300\n")
    proc = subprocess.Popen(["lazybuild", "build", "--progress", "plain", "--no-cache", str(ctx)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "started" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) != 0
    assert _leftovers() == ("", "")


def test_optimize_puts_what_the_workload_reads_first(lazy_base, registry, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("a", "b", "c", "d"):
        (ctx / name).write_text(name * 1000)
    (ctx / "Dockerfile").write_text(f"FROM {lazy_base}\nCOPY a b c d /data/\nCMD [\"cat\", \"/data/c\", \"/data/a\"]\n")
    ref = f"{registry.host}/built/optimized:1"
    record = tmp_path / "base-reads.ndjson"
    p = lazy_build(ctx, "-t", ref, "--output", "type=stargz,push=true", "--optimize", "--optimize-period", "5",
                   "--record-base", str(record))
    assert "layer 1 (new, reordered): 2 files" in p.stderr, p.stderr[-2000:]
    subprocess.run(["lazybuild", "pull", ref, f"oci:{tmp_path / 'layout'}"], check=True, capture_output=True)
    info = json.loads(lazybuild("inspect", "--format", "json", ref).stdout)
    blob = tmp_path / "layout" / "blobs" / "sha256" / info["manifest"]["layers"][1]["digest"].split(":")[1]
    names = [e["path"] for e in json.loads(lazybuild("layer", "ls", str(blob), "--format", "json").stdout)]
    assert names.index("data/c") < names.index("data/a") < names.index(".prefetch.landmark") < names.index("data/b")
