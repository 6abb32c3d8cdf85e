"""`--cache-to` / `--cache-from` (builder/cache_transfer.py): the specs as buildx spells them, and the step cache
carried through an OCI layout and back (whiteouts, opaque directories, links, owners kept); a hostile cache
refused. The registry round trip is in tests/integration/test_build_cli.py."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest

from lazybuild.builder.cache_transfer import (CONFIG_MEDIA_TYPE, KEY_ANNOTATION, STEP_MEDIA_TYPE, CacheSpec,
                                              CacheSpecError, export_steps, import_steps)
from lazybuild.image import Descriptor, Manifest, canonical_json, sha256_digest
from lazybuild.layout import OCILayout

from test_cli import LAZYBUILD


@pytest.mark.parametrize("text, direction, want", [
    ("type=local,dest=/c", "to", CacheSpec("local", path="/c")),
    ("type=local,src=/c", "from", CacheSpec("local", path="/c")),
    ("type=registry,ref=127.0.0.1:5000/c:build,mode=max", "to", CacheSpec("registry", ref="127.0.0.1:5000/c:build")),
    ("127.0.0.1:5000/c", "from", CacheSpec("registry", ref="127.0.0.1:5000/c:latest")),
])
def test_specs(text, direction, want):
    assert CacheSpec.parse(text, direction) == want


@pytest.mark.parametrize("text, direction, message", [
    ("type=inline", "to", "--cache-to type=inline: not supported by lazybuild"),
    ("type=gha", "from", "--cache-from type=gha: not supported by lazybuild"),
    ("type=s3,bucket=x", "to", "type=s3: not supported"),
    ("type=local,src=/c", "to", "unknown key src (known for type=local: type, dest, mode)"),
    ("type=local", "from", "type=local needs src=DIR"),
    ("type=registry", "to", "type=registry needs ref=REGISTRY/NAME:TAG"),
    ("type=local,dest=/c,mode=all", "to", "mode=all: want min or max"),
    ("type=ftp,dest=/c", "to", "type=ftp: want local or registry"),
    ("r/c@sha256:" + "a" * 64, "from", "name the cache by a tag, not a digest"),
])
def test_bad_specs(text, direction, message):
    with pytest.raises(CacheSpecError) as e:
        CacheSpec.parse(text, direction)
    assert message in str(e.value)


def test_cache_to_inline_is_refused_not_taken_as_the_context(tmp_path):
    p = subprocess.run([LAZYBUILD, "build", "--state-dir", str(tmp_path / "s"), "--cache-to", "type=inline",
                        str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "--cache-to type=inline: not supported by lazybuild" in p.stderr, p.stderr
    assert not (tmp_path / "s").exists()


KEY1, KEY2 = "1" * 64, "2" * 64


def _step(steps_dir, key):
    upper = steps_dir / key[:32] / "upper"
    upper.mkdir(parents=True)
    (steps_dir / key[:32] / "done").write_text("{}")
    return upper


def _tree(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            xattr = os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) \
                if "trusted.overlay.opaque" in os.listxattr(path, follow_symlinks=False) else None
            target = os.readlink(path) if os.path.islink(path) else None
            data = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_nlink, xattr, target, data)
    return out


def test_round_trip_through_a_layout(tmp_path):
    steps = tmp_path / "steps"
    upper = _step(steps, KEY1)
    (upper / "etc").mkdir()
    (upper / "etc/app.conf").write_text("conf\n")
    os.chown(upper / "etc/app.conf", 1000, 1001)
    os.chmod(upper / "etc/app.conf", 0o4750)
    os.link(upper / "etc/app.conf", upper / "etc/hard")
    os.symlink("app.conf", upper / "etc/link")
    os.mknod(upper / "etc/removed", 0o600 | 0o020000, os.makedev(0, 0))  # an overlay whiteout
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    _step(steps, KEY2)
    (steps / KEY2[:32] / "upper" / "second").write_text("2\n")
    cache = tmp_path / "cache"
    export_steps([KEY1, KEY2, KEY1, "3" * 64], str(steps), CacheSpec("local", path=str(cache)))  # 3: never ran

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert import_steps(CacheSpec("local", path=str(cache)), str(fresh)) == 2
    for key in (KEY1, KEY2):
        assert _tree(fresh / key[:32] / "upper") == _tree(steps / key[:32] / "upper")
        assert (fresh / key[:32] / "done").exists()
    assert sorted(os.listdir(fresh)) == sorted([KEY1[:32], KEY2[:32]])  # no temporary dirs left
    assert import_steps(CacheSpec("local", path=str(cache)), str(fresh)) == 0  # all here already
    # a missing cache is not an error (as buildx): nothing imported
    assert import_steps(CacheSpec("local", path=str(tmp_path / "none")), str(fresh)) == 0


def _evil_cache(path, entries, key=KEY1, media_type=STEP_MEDIA_TYPE):
    layout = OCILayout(str(path), create=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for name, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tf.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    blob = buf.getvalue()
    layer = Descriptor(media_type, layout.put_bytes(blob), len(blob), {KEY_ANNOTATION: key})
    config = canonical_json({"steps": []})
    layout.put_bytes(config)
    manifest = Manifest.build(Descriptor(CONFIG_MEDIA_TYPE, sha256_digest(config), len(config)), [layer])
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), "latest")


@pytest.mark.parametrize("entries, key, media_type, message", [
    ([("../../escape", tarfile.REGTYPE, "")], KEY1, STEP_MEDIA_TYPE, "would leave the destination"),
    ([("l", tarfile.SYMTYPE, "/"), ("l/etc/x", tarfile.REGTYPE, "")], KEY1, STEP_MEDIA_TYPE, "under a symlink"),
    ([("h", tarfile.LNKTYPE, "../../../etc/passwd")], KEY1, STEP_MEDIA_TYPE, "points out of the destination"),
    ([("f", tarfile.REGTYPE, "")], "../../" + "a" * 58, STEP_MEDIA_TYPE, "is not a step of a lazybuild cache"),
    ([("f", tarfile.REGTYPE, "")], KEY1, "application/octet-stream", "is not a step of a lazybuild cache"),
])
def test_a_hostile_cache_is_refused(tmp_path, canary, entries, key, media_type, message):
    _evil_cache(tmp_path / "cache", entries, key, media_type)
    steps = tmp_path / "steps"
    steps.mkdir()
    with pytest.raises(Exception) as e:
        import_steps(CacheSpec("local", path=str(tmp_path / "cache")), str(steps))
    assert message in str(e.value) and e.value.exit_code == 1
    assert os.listdir(steps) == []


def test_not_a_step_cache(tmp_path):
    layout = OCILayout(str(tmp_path / "c"), create=True)
    config = json.dumps({"architecture": "amd64"}).encode()
    manifest = Manifest.build(Descriptor("application/vnd.oci.image.config.v1+json", layout.put_bytes(config),
                                         len(config)), [])
    layout.put_bytes(manifest.raw)
    layout.add_to_index(manifest.descriptor(), "latest")
    with pytest.raises(Exception, match="not a lazybuild step cache"):
        import_steps(CacheSpec("local", path=str(tmp_path / "c")), str(tmp_path))
