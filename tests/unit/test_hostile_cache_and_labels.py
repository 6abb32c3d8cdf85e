"""Hostile keys and labels without FUSE, a registry or a snapshotter (issue 14): the chunk cache refuses
keys that are not exact digests and does not follow planted symlinks; the snapshotter's Prepare labels are
checked before anything is fetched. (The same attacks through real mounts: integration/test_hostile_mount.py.)"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from lazybuild.digest import sha256_digest
from lazybuild.mounter import ChunkCache
from lazybuild.snapshotter import remote
from support.evil_keys import old_cache_path


def test_cache_refuses_bad_keys_and_planted_files(canary, tmp_path):
    """Without FUSE: every ChunkCache entry point refuses a key that is not an exact digest, and a
    symlink planted under a digest's name is not followed."""
    cache = ChunkCache(str(tmp_path / "cache"))
    for bad in ("sha256:" + canary.victim, old_cache_path(str(tmp_path / "cache"), canary.victim),
                "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 64, "", "sha256:" + "a" * 64 + "\n"):
        for call in (cache.get, cache.has, cache.discard, cache.path, lambda d: cache.put(d, b"x")):
            with pytest.raises(ValueError, match="chunk cache key"):
                call(bad)
    data = b"secret-looking chunk"
    digest = sha256_digest(data)
    path = cache.path(digest)
    os.makedirs(os.path.dirname(path))
    os.symlink(canary.secret, path)
    assert cache.get(digest) is None  # not followed; dropped, so the real chunk can be stored
    assert not os.path.lexists(path)
    assert cache.put(digest, data) and cache.get(digest) == data


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_cache_path_is_inside_its_root_or_refused(tmp_path_factory, text):
    root = str(tmp_path_factory.getbasetemp() / "prop-cache")
    cache = ChunkCache(root)
    for key in (text, "sha256:" + text):
        try:
            path = cache.path(key)
        except ValueError:
            continue
        assert os.path.dirname(os.path.dirname(path)) == cache.root and os.path.basename(path) == key[7:]


def test_label_rules_without_services():
    d = "sha256:" + "1" * 64
    t = "sha256:" + "2" * 64
    stargz = {remote.STARGZ_REF: "evil.example/x:1", remote.STARGZ_DIGEST: d, remote.TOC_LABEL: t}
    cri = {remote.CRI_REF: "registry.example/app:1", remote.CRI_DIGEST: d, remote.CRI_LAYERS: f"{d},{t}"}
    src = remote.LayerSource.from_labels({**stargz, **cri})
    assert (src.reference, src.digest, src.toc_digest, src.neighbours) == ("registry.example/app:1", d, t, [t])
    assert remote.LayerSource.from_labels({**stargz, remote.CRI_REF: "registry.example/app:1"}) is None
    assert remote.LayerSource.from_labels(stargz).reference == "evil.example/x:1"
    for label, value in ((remote.STARGZ_DIGEST, "sha256:../../etc/shadow"), (remote.CRI_LAYERS, f"{d},"),
                         (remote.TOC_LABEL, d.upper()), (remote.STARGZ_REF, "a b/c"),
                         (remote.CRI_REF, "host:99999999/x"), (remote.STARGZ_REF, "h@x.example/y")):
        with pytest.raises(remote.LabelError, match=label.replace(".", r"\.")):
            remote.LayerSource.from_labels({**stargz, **cri, label: value})
    with pytest.raises(remote.LabelError):
        remote.LayerSource.from_json({"reference": "registry.example/app:1", "digest": "sha256:../x"})
