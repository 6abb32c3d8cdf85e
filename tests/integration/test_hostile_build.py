"""Evil build contexts, Dockerfiles, stages, archives and base images against `lazybuild build`.

Each case aims at a canary tree on the host (tests/support/canary.py) the way an attacker would: symlinks to
its absolute path or `../..` chains in the context, in an earlier stage, in the base image; archive
members that climb out; `.dockerignore` aliases. Each must end in a clear error or a result confined
to the image, and the canary must come out untouched.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.canary import Canary
from support.cli_runner import lazybuild


def build(ctx, *args, ok=True, timeout=600):
    p = subprocess.run(["lazybuild", "build", "--progress", "plain", *args, str(ctx)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "CI": "1"})
    if ok and p.returncode != 0:
        raise AssertionError(f"lazybuild build failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def tar_members(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name.lstrip("./"): m for m in tf.getmembers()}


def tar_file(path, name) -> bytes:
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.name.lstrip("./") == name:
                return tf.extractfile(m).read()
    raise KeyError(name)


def rootfs_out(tmp_path, ctx, *args):
    out = tmp_path / "out.tar"
    build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={out}", *args)
    return out


def write(path, text="x\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ---- the context and earlier steps

def test_copy_through_a_symlink_an_earlier_step_made_stays_in_the_image(tmp_path, canary):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx / "evil/app")
    os.symlink(canary.writable_dir, ctx / "evil/app/sub")
    os.symlink("../" * 12 + canary.root.lstrip("/"), ctx / "evil/app/up")
    write(ctx / "conf/pwn.conf", "* * * * * root sh -c pwned\n")
    write(ctx / "Dockerfile", "FROM scratch\nCOPY evil/ /\nCOPY conf/ /app/sub/\n"
                              "COPY --chmod=4777 conf/pwn.conf /app/up/etc/shadow\n"
                              "COPY conf/pwn.conf /app/sub/deeper/new/\nWORKDIR /app/up/root/wd\n")
    out = rootfs_out(tmp_path, ctx)
    inside = canary.writable_dir.lstrip("/")
    members = tar_members(out)
    assert f"{inside}/pwn.conf" in members and f"{inside}/deeper/new/pwn.conf" in members
    assert tar_file(out, canary.secret.lstrip("/")).startswith(b"* * * * *")
    assert members[canary.secret.lstrip("/")].mode & 0o7777 == 0o4777
    assert f"{canary.root.lstrip('/')}/root/wd" in members
    assert members["app/sub"].issym()  # the image keeps its symlink; only what it names was written


def test_context_symlinks_are_followed_only_inside_the_context(tmp_path, canary):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx)
    os.symlink(os.path.dirname(canary.secret), ctx / "hostetc")
    os.symlink(canary.secret, ctx / "hostfile")
    os.symlink("../" * 12 + canary.secret.lstrip("/"), ctx / "climb")
    for src in ("hostetc/shadow", "hostfile", "climb"):
        write(ctx / "Dockerfile", f"FROM scratch\nCOPY {src} /x\n")
        p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False)
        assert p.returncode != 0 and "not found" in p.stderr, p.stderr
        assert "CANARY-SECRET" not in p.stderr + p.stdout
    # A link whose target exists inside the context is followed there, as BuildKit does.
    write(ctx / canary.secret.lstrip("/"), "the context's own file\n")
    write(ctx / "Dockerfile", "FROM scratch\nCOPY hostfile /x\nCOPY climb /y\nCOPY hostetc/shadow /z\n")
    out = rootfs_out(tmp_path, ctx)
    for name in ("x", "y", "z"):
        assert tar_file(out, name) == b"the context's own file\n"


def test_dockerignore_is_applied_to_what_is_really_read(tmp_path, canary):
    ctx = tmp_path / "ctx"
    write(ctx / "secret/key", "private\n")
    write(ctx / "public/readme", "hello\n")
    os.symlink("secret", ctx / "alias")
    os.symlink("secret/key", ctx / "keylink")
    write(ctx / ".dockerignore", "secret\n")
    for src in ("alias/key", "alias", "keylink"):
        write(ctx / "Dockerfile", f"FROM scratch\nCOPY {src} /x\n")
        p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False)
        assert p.returncode != 0 and "not found" in p.stderr, (src, p.stderr)
    write(ctx / "Dockerfile", "FROM scratch\nCOPY . /all/\nCOPY a* /wild/\n")
    out = rootfs_out(tmp_path, ctx)
    names = tar_members(out)
    assert "all/public/readme" in names and "all/alias" in names and names["all/alias"].issym()
    assert not any("key" in n and "keylink" not in n for n in names), sorted(names)


def test_copy_from_a_stage_follows_its_symlinks_inside_the_stage(tmp_path, canary):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx / "evil")
    os.symlink(canary.secret, ctx / "evil/s")
    os.symlink(os.path.dirname(canary.secret), ctx / "evil/d")
    write(ctx / "Dockerfile", "FROM scratch AS evil\nCOPY evil/ /\n"
                              "FROM scratch\nCOPY --from=evil /s /out\n")
    p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False)
    assert p.returncode != 0 and "not found" in p.stderr and "CANARY-SECRET" not in p.stderr
    write(ctx / "Dockerfile", "FROM scratch AS evil\nCOPY evil/ /\n"
                              "FROM scratch\nCOPY --from=evil /d/ /out/\nCOPY --from=evil / /all/\n")
    p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False)
    assert p.returncode != 0 and "not found" in p.stderr
    write(ctx / "Dockerfile", "FROM scratch AS evil\nCOPY evil/ /\nFROM scratch\nCOPY --from=evil / /all/\n")
    out = rootfs_out(tmp_path, ctx)
    assert tar_members(out)["all/s"].issym()  # copied as the link it is, never followed


def test_a_dockerfile_that_links_to_a_host_file_is_not_read(tmp_path, canary):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx)
    os.symlink(canary.secret, ctx / "Dockerfile")
    p = build(ctx, "--state-dir", str(tmp_path / "state"), ok=False)
    assert p.returncode != 0 and "CANARY-SECRET" not in p.stderr + p.stdout, p.stderr


# ---- ADD of local archives

def _evil_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data) if data is not None else None)


def _member(name, kind=tarfile.REGTYPE, data=b"pwned\n", linkname=""):
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = linkname
    m.mode = 0o644
    if kind == tarfile.REGTYPE:
        m.size = len(data)
        return m, data
    return m, None


def _negative_size_tar(path):
    m = tarfile.TarInfo("neg")
    m.size = 0
    block = bytearray(m.tobuf(tarfile.GNU_FORMAT))
    block[124:136] = b"\xff" * 12  # GNU base-256: -1
    chk = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    block[148:156] = f"{chk:06o}\0 ".encode()
    with open(path, "wb") as f:
        f.write(bytes(block) + b"\0" * 1024)


@pytest.mark.parametrize("case", ["dotdot", "symlink-then-file", "hardlink-out", "negative-size"])
def test_add_archive_members_cannot_leave_the_destination(tmp_path, canary, case):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx)
    arc = str(ctx / "evil.tar")
    if case == "dotdot":
        _evil_tar(arc, [_member("ok"), _member("a/../../" + "../" * 12 + canary.victim.lstrip("/"))])
    elif case == "symlink-then-file":
        _evil_tar(arc, [_member("l", tarfile.SYMTYPE, linkname=canary.writable_dir), _member("l/pwn")])
    elif case == "hardlink-out":
        _evil_tar(arc, [_member("h", tarfile.LNKTYPE, linkname="../../../../../../../../" + canary.secret.lstrip("/"))])
    else:
        _negative_size_tar(arc)
    write(ctx / "Dockerfile", "FROM scratch\nADD evil.tar /dst/\n")
    p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False,
              timeout=120)
    assert p.returncode != 0, p.stderr
    assert "evil.tar" in p.stderr and "line 2" in p.stderr, p.stderr


def test_add_archive_absolute_names_are_rebased(tmp_path, canary):
    ctx = tmp_path / "ctx"
    os.makedirs(ctx)
    _evil_tar(str(ctx / "abs.tar"), [_member(canary.writable_dir + "/abs.conf"), _member("/etc/x", data=b"x\n"),
                                     _member("lnk", tarfile.SYMTYPE, linkname=canary.writable_dir),
                                     _member("hl", tarfile.LNKTYPE, linkname="/etc/x")])
    write(ctx / "Dockerfile", "FROM scratch\nADD abs.tar /dst/\n")
    out = rootfs_out(tmp_path, ctx)
    names = tar_members(out)
    assert f"dst/{canary.writable_dir.lstrip('/')}/abs.conf" in names and "dst/etc/x" in names
    assert names["dst/lnk"].issym() and (names["dst/hl"].islnk() or names["dst/etc/x"].islnk())


# ---- base images from a registry

@pytest.fixture(scope="module")
def evil_base(registry, tmp_path_factory):
    """The Debian test rootfs with an evil top layer: symlinks to a host canary (absolute and `../`)."""
    d = tmp_path_factory.mktemp("evil-base")
    canary = Canary()
    top = str(d / "top.tar")
    with tarfile.open(top, "w") as tf:
        for name, target in (("app/sub", canary.writable_dir), ("app/up", "../" * 12 + canary.root.lstrip("/"))):
            m = tarfile.TarInfo(name)
            m.type, m.linkname = tarfile.SYMTYPE, target
            tf.addfile(m)
    ref = f"{registry.host}/hostile/base:latest"
    lazybuild("convert", f"docker-archive:{docker_archive([debootstrap_rootfs(), top], str(d / 'img.tar'))}", ref)
    yield ref, canary
    canary.check()
    canary.remove()


def test_workdir_run_cwd_copy_and_bind_sources_stay_in_the_base(evil_base, tmp_path):
    ref, canary = evil_base
    ctx = tmp_path / "ctx"
    write(ctx / "conf/pwn.conf", "* * * * * root sh -c pwned\n")
    os.symlink(canary.root, ctx / "hostroot")
    write(ctx / "Dockerfile", f"""FROM {ref} AS b
COPY conf/ /app/sub/
WORKDIR /app/sub/wd
RUN pwd > here && touch ran
WORKDIR /app/up/root
RUN --mount=type=bind,source=../../..,target=/m ls /m > /app/ctx-listing
RUN --mount=type=bind,source=hostroot,target=/m2 true || true
FROM scratch
COPY --from=b /app /app
COPY --from=b {canary.root} /c
""")
    p = build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={tmp_path}/o.tar", ok=False)
    # the bind of `hostroot` (-> the canary's absolute path) names nothing inside the context
    assert p.returncode != 0 and "hostroot" in p.stderr and "not found" in p.stderr, p.stderr[-3000:]
    text = (ctx / "Dockerfile").read_text().replace("RUN --mount=type=bind,source=hostroot,target=/m2 true || true\n", "")
    write(ctx / "Dockerfile", text)
    out = tmp_path / "out.tar"
    build(ctx, "--state-dir", str(tmp_path / "state"), "--output", f"type=tar,dest={out}")
    names = tar_members(out)
    assert "c/etc/cron.d/pwn.conf" in names and "c/etc/cron.d/wd/ran" in names
    assert tar_file(out, "c/etc/cron.d/wd/here").decode().strip() == canary.writable_dir + "/wd"
    listing = tar_file(out, "app/ctx-listing").decode().split()
    assert sorted(listing) == ["Dockerfile", "conf", "hostroot"]
    canary.check()


def test_copy_from_an_image_is_cached_by_digest(registry, tmp_path):
    """A moved tag gives a new step, not the old result from the cache."""
    ref = f"{registry.host}/hostile/moving:latest"
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", f"FROM scratch\nCOPY --from={ref} /f /f\n")
    for content in (b"first\n", b"second\n"):
        layer = str(tmp_path / "layer.tar")
        _evil_tar(layer, [_member("f", data=content)])
        lazybuild("convert", f"docker-archive:{docker_archive([layer], str(tmp_path / 'img.tar'))}", ref, "--force")
        out = rootfs_out(tmp_path, ctx)
        assert tar_file(out, "f") == content
