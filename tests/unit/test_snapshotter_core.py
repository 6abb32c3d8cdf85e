"""The snapshotter without containerd, FUSE or a registry: the snapshot store's list filters as containerd
writes them, and the configuration file. (The snapshotter under containerd: integration/test_snapshotter.py.)"""

from __future__ import annotations

import pytest


def test_list_filters_as_containerd_writes_them(tmp_path):
    """The filter strings containerd's metadata store and ctr send, on a snapshotter without lazy layers."""
    from lazybuild.snapshotter.snapshots import Snapshotter as Core
    from lazybuild.snapshotter.store import SnapshotError

    core = Core(str(tmp_path), None)
    core.prepare("a", "", {"containerd.io/snapshot.ref": "sha256:aaa", "team": "x"})
    core.commit("A", "a", {"containerd.io/snapshot.ref": "sha256:aaa", "team": "x"})
    core.prepare("b", "A", {})
    core.view("v", "A", {"team": "y"})

    def names(*filters):
        return sorted(s.key for s in core.list(list(filters)))

    assert names() == ["A", "b", "v"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:aaa,parent==""') == ["A"]
    assert names('parent=="A"') == ["b", "v"]
    assert names("kind==view", "name==b") == ["b", "v"]  # several filters: any
    assert names("labels.team") == ["A", "v"]  # presence
    assert names('labels.team!=x,parent==A') == ["b", "v"]
    assert names("name~=^[AB]$") == ["A"]
    with pytest.raises(SnapshotError) as e:
        core.commit("A", "b", {})
    assert e.value.code == "already_exists"
    with pytest.raises(SnapshotError) as e:
        core.commit("V", "v", {})
    assert e.value.code == "failed_precondition"
    with pytest.raises(SnapshotError) as e:
        core.remove("A")
    assert e.value.code == "failed_precondition"
    assert core.update("A", {"team": "z"}, ["labels.team"]).labels == {"containerd.io/snapshot.ref": "sha256:aaa",
                                                                       "team": "z"}
    with pytest.raises(SnapshotError):
        core.update("A", {}, ["parent"])
    core.close()


def test_config_file(tmp_path):
    from lazybuild.snapshotter import config

    good = tmp_path / "good.toml"
    good.write_text('prefetch = false\nbackground_idle_seconds = 2\n'
                    '[resolver.host."10.0.0.5:5000"]\n  insecure = true\n'
                    '[[resolver.host."registry.example.com".mirrors]]\n  host = "mirror:5000"\n  insecure = true\n')
    cfg = config.load(str(good))
    assert cfg.prefetch is False and cfg.background_idle_seconds == 2.0
    assert [(h.host, h.insecure) for h in cfg.candidates("registry.example.com")] == \
        [("mirror:5000", True), ("registry.example.com", False)]
    assert [(h.host, h.insecure) for h in cfg.candidates("10.0.0.5:5000")] == [("10.0.0.5:5000", True)]
    for text, needle in (("prefetch = 1\n", "prefetch must be true or false"),
                         ("cache_limit = 5\n", "unknown setting(s) cache_limit"),
                         ('[resolver.host."h:1"]\ninsecure = true\nprefetch = false\n', "top-level settings go before"),
                         ("prefetch = \n", "bad.toml")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(config.ConfigError) as e:
            config.load(str(bad))
        assert needle in str(e.value), str(e.value)


def test_buildkit_labels_empty_means_absent(tmp_path):
    """BuildKit (util/estargz/labels.go) sends containerd.io/snapshot/stargz/toc.digest empty for every layer
    without the annotation, and removes its temporary labels by updating them to "": an empty label is an
    absent one, as in containerd's own stores. A plain gzip layer's Prepare is then an ordinary active
    snapshot (BuildKit downloads the layer), answered without a registry request."""
    from lazybuild.snapshotter.config import Config
    from lazybuild.snapshotter.remote import LayerSource, LazyLayers
    from lazybuild.snapshotter.snapshots import Snapshotter as Core

    digest = "sha256:" + "ab" * 32
    labels = {"containerd.io/snapshot.ref": "sha256:" + "cd" * 32,
              "containerd.io/snapshot/stargz/toc.digest": "",
              "containerd.io/snapshot/remote/stargz.reference": "127.0.0.1:9/bk/img:legacy",  # nothing listens
              "containerd.io/snapshot/remote/stargz.digest": digest,
              "containerd.io/snapshot/remote/stargz.layers": digest,
              "containerd.io/snapshot/stargz/toc.digest.0123": ""}
    source = LayerSource.from_labels(labels)
    assert (source.digest, source.toc_digest) == (digest, "")

    lazy = LazyLayers(str(tmp_path / "lazy"), Config())
    core = Core(str(tmp_path), lazy)
    try:
        mounts = core.prepare("tmp-1 sha256:" + "cd" * 32, "", labels)
        assert [m.type for m in mounts] == ["bind"]  # an active snapshot: not AlreadyExists, not InvalidArgument
        snap = core.stat("tmp-1 sha256:" + "cd" * 32)
        assert "containerd.io/snapshot/stargz/toc.digest" not in snap.labels and snap.remote is None
        assert not lazy._registries  # refused before any registry client was made
        core.commit("C", "tmp-1 sha256:" + "cd" * 32, {"a": "1", "b": ""})
        assert core.stat("C").labels == {"a": "1"}
        core.update("C", {"a.x": "2", "s.x": "sid"}, ["labels.a.x", "labels.s.x"])
        assert core.update("C", {"a.x": "", "s.x": ""}, ["labels.a.x", "labels.s.x"]).labels == {"a": "1"}
        assert core.update("C", {"a": ""}, ["labels.a"]).labels == {}
    finally:
        core.close()
        lazy.close()
