"""LAZYBUILD_OPTIMIZE's pieces that need no service: fanotify event parsing, event paths, the recording's
order and bound, the workload from the image config, and which layer each recorded file leads."""

from __future__ import annotations

import os
import shutil

import pytest

from lazybuild.exporter.assemble import ConvertedLayer, KeptLayer, NewLayer
from lazybuild.exporter.buildkit import ExportError, ExportSettings, Optimize, order_by_workload
from lazybuild.exporter.tree_diff import TreeDiff
from lazybuild.exporter.workload import (EVENT, FAN_OPEN, FANOTIFY_METADATA_VERSION, Event, Recording, Workload,
                                         WorkloadError, parse_events, tree_path)


def _event(mask: int, fd: int, pid: int, length: int = EVENT.size, vers: int = FANOTIFY_METADATA_VERSION) -> bytes:
    return EVENT.pack(length, vers, 0, EVENT.size, mask, fd, pid)


def test_parse_events_reads_each_record_and_stops_at_a_bad_one():
    buf = _event(FAN_OPEN, 5, 100) + _event(FAN_OPEN | 0x1000, 6, 101)
    assert parse_events(buf) == [Event(FAN_OPEN, 5, 100), Event(FAN_OPEN | 0x1000, 6, 101)]
    # A record longer than what was read, one shorter than the metadata, another version: nothing past it.
    assert parse_events(_event(FAN_OPEN, 5, 1) + _event(FAN_OPEN, 6, 1, length=EVENT.size + 8)) == [Event(FAN_OPEN, 5, 1)]
    assert parse_events(_event(FAN_OPEN, 5, 1, length=8) + _event(FAN_OPEN, 6, 1)) == []
    assert parse_events(_event(FAN_OPEN, 5, 1, vers=2)) == []
    assert parse_events(_event(FAN_OPEN, 5, 1)[:-1]) == []
    # A longer record (information records after the metadata) is stepped over whole.
    long = EVENT.pack(EVENT.size + 16, FANOTIFY_METADATA_VERSION, 0, EVENT.size, FAN_OPEN, 7, 1) + b"\0" * 16
    assert parse_events(long + _event(FAN_OPEN, 8, 2)) == [Event(FAN_OPEN, 7, 1), Event(FAN_OPEN, 8, 2)]


def test_tree_path_strips_the_overlay_or_takes_the_workloads_view():
    root = "/tmp/lazybuild-workload-x/merged"
    assert tree_path(root + "/app/data/a", root) == "app/data/a"
    assert tree_path(root + "/", root) is None
    assert tree_path("/usr/bin/dash", root) == "usr/bin/dash"  # opened after pivot_root: the overlay is `/`
    assert tree_path(root + "/tmp/gone (deleted)", root) is None
    assert tree_path("anon_inode:[eventfd]", root) is None


def test_recording_keeps_first_opens_once_and_is_bounded():
    r = Recording(limit=3)
    for p in ["b", "a", "b", "c", "a", "d", "e"]:
        r.add(p)
    assert r.paths == ["b", "a", "c"]


def test_workload_comes_from_the_image_config_unless_named():
    config = {"config": {"Entrypoint": ["/entry"], "Cmd": ["run", "x"], "Env": ["A=1", "PATH=/opt/bin"],
                         "WorkingDir": "/app", "User": "app"}}
    w = Workload.from_config(config, [], 5)
    assert (w.argv, w.env, w.workdir, w.user, w.period_s) == (("/entry", "run", "x"), ("A=1", "PATH=/opt/bin"), "/app", "app", 5.0)
    w = Workload.from_config({"config": {"Cmd": ["sh"]}}, ["cat", "/f"], 2)
    assert w.argv == ("cat", "/f") and w.env[0].startswith("PATH=/usr/local/sbin") and w.workdir == "/" and w.user == ""
    with pytest.raises(WorkloadError, match="no ENTRYPOINT or CMD") as e:
        Workload.from_config({"config": {}}, [], 5)
    assert "LAZYBUILD_OPTIMIZE_CMD" in e.value.hint


def test_optimize_settings_load(tmp_path):
    meta = tmp_path / "export.json"
    meta.write_text('{"states": 2, "config": {}, "optimize": {"cmd": ["a", "b"], "period": 3}}')
    assert ExportSettings.load(str(meta)).optimize == Optimize(("a", "b"), 3.0)
    meta.write_text('{"states": 2, "config": {}}')
    assert ExportSettings.load(str(meta)).optimize is None
    with pytest.raises(ExportError):
        Optimize.load({"cmd": "sh -c x", "period": 3})


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_each_recorded_file_leads_the_topmost_layer_that_writes_it(tmp_path):
    s0, s1, s2 = (str(tmp_path / n) for n in ("s0", "s1", "s2"))
    _write(s0, "usr/bin/tool", "tool")
    _write(s0, "etc/conf", "v1")
    _write(s0, "lib/old", "old")
    shutil.copytree(s0, s1, symlinks=True)  # copy2: unchanged files stay the same (mtime kept)
    _write(s1, "etc/conf", "v2 longer")  # changed in layer 1
    _write(s1, "app/one", "one")
    os.symlink("/usr/bin", os.path.join(s1, "bin"))
    shutil.copytree(s1, s2, symlinks=True)
    _write(s2, "app/two", "two")
    os.unlink(os.path.join(s2, "lib/old"))  # gone in layer 2: its older copy is what no one reads
    kept = KeptLayer(None, "sha256:x", None)
    layers = [kept, NewLayer(TreeDiff(None, s0)), NewLayer(TreeDiff(s0, s1), ("listed",)),
              NewLayer(TreeDiff(s1, s2), ("listed", "app/two"))]
    recorded = ["app/two", "etc/conf", "usr/bin/tool", "app/one", "tmp/made-by-the-workload", "bin/tool", "lib/old"]
    out = order_by_workload(layers, recorded, ("listed", "app/two"))
    assert out[0] is kept
    assert out[1].prioritized_files == ("usr/bin/tool", "lib/old", "listed", "app/two")
    assert out[2].prioritized_files == ("etc/conf", "app/one", "listed", "app/two")
    assert out[3].prioritized_files == ("app/two", "listed")
    assert [lay.diff for lay in out[1:]] == [lay.diff for lay in layers[1:]]
    # A base converted to eStargz: the recorded files no new layer writes lead each converted layer
    # (each takes those it holds when it is converted); a kept one stays as it is.
    converted = ConvertedLayer(None, None)
    out = order_by_workload([kept, converted, NewLayer(TreeDiff(s0, s1))], recorded)
    assert out[0] is kept
    assert out[1].prioritized_files == ("app/two", "usr/bin/tool", "tmp/made-by-the-workload", "bin/tool", "lib/old")
    assert out[2].prioritized_files == ("etc/conf", "app/one")


def test_a_symlink_on_the_way_in_a_lower_state_is_not_followed(tmp_path):
    # In the lower state `app` is a symlink to a host directory holding the very same file: followed, it
    # would make the upper's app/f look unchanged. The tree has no app/f there: the upper writes it.
    lower, upper, host = str(tmp_path / "lower"), str(tmp_path / "upper"), str(tmp_path / "host")
    _write(upper, "app/f", "f")
    os.makedirs(host)
    shutil.copy2(os.path.join(upper, "app/f"), os.path.join(host, "f"))
    os.makedirs(lower)
    os.symlink(host, os.path.join(lower, "app"))
    out = order_by_workload([NewLayer(TreeDiff(lower, upper))], ["app/f"])
    assert out[0].prioritized_files == ("app/f",)
