"""`lazybuild build` (no daemon: runc on overlayfs over lazily mounted eStargz bases) against BuildKit.

The Dockerfiles of tests/frontend_corpus are built by lazybuild build from the Debian test image pushed
to a local registry as eStargz, and by Docker 20.10's BuildKit from the same image: the image configs
and the flattened final filesystems must be equal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from cli_runner import lazybuild
from flatten import flatten_docker_save, flatten_oci_tar
from test_frontend import CONFIG_FIELDS, CORPUS

pytestmark = pytest.mark.integration

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
