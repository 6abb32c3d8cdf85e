"""Build args the frontend reads itself: SOURCE_DATE_EPOCH (history times, as BuildKit v0.11's frontend),
LAZYBUILD_CONVERT_BASE and the LAZYBUILD_OPTIMIZE family (the stargz export step's settings)."""

from __future__ import annotations

import pytest

from lazybuild.dockerfile import model
from lazybuild.dockerfile.parser import DockerfileError
from lazybuild.frontend.main import clamp_times, flag, image_config, optimize_settings, source_date_epoch
from lazybuild.frontend.llb.proto import ops_pb2 as pb

AMD64 = pb.Platform(OS="linux", Architecture="amd64")
BASE = {"config": {"Env": ["PATH=/bin"]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "old"},
                    {"created": "2030-01-01T00:00:00.5Z", "created_by": "from the future"},
                    {"created_by": "no time"}, {"created": "yesterday", "created_by": "unreadable"}]}


def test_source_date_epoch_sets_this_builds_history_and_clamps_the_base():
    build = model.load("FROM base\nENV A=1\nRUN true\n", base_configs={"base": BASE})
    image = image_config(build, AMD64, {}, source_date_epoch({"SOURCE_DATE_EPOCH": "1700000000"}))
    epoch = "2023-11-14T22:13:20Z"
    assert [h.get("created") for h in image["history"]] == ["2020-01-01T00:00:00Z", epoch, epoch, epoch, epoch, epoch]
    assert [h["created_by"] for h in image["history"]][:4] == ["old", "from the future", "no time", "unreadable"]
    # Without it nothing changes: the daemon's exporter stamps the image.
    plain = image_config(build, AMD64, {})
    assert [h.get("created") for h in plain["history"]] == ["2020-01-01T00:00:00Z", "2030-01-01T00:00:00.5Z",
                                                           None, "yesterday", None, None]
    assert clamp_times([], 0) == []


@pytest.mark.parametrize("value", ["soon", "1.5", "0x10"])
def test_a_bad_source_date_epoch_is_refused(value):
    with pytest.raises(DockerfileError, match=f"invalid SOURCE_DATE_EPOCH: {value}"):
        source_date_epoch({"SOURCE_DATE_EPOCH": value})
    assert source_date_epoch({}) is None


def test_boolean_build_args():
    assert flag({}, "X", True) is True and flag({"X": ""}, "X", False) is False
    assert flag({"X": "0"}, "X", True) is False and flag({"X": "TRUE"}, "X", False) is True
    with pytest.raises(DockerfileError, match="X=maybe: want 1 or 0"):
        flag({"X": "maybe"}, "X", True)


def test_optimize_settings():
    assert optimize_settings({}) is None and optimize_settings({"LAZYBUILD_OPTIMIZE": "0"}) is None
    assert optimize_settings({"LAZYBUILD_OPTIMIZE": "1"}) == {"cmd": [], "period": 10.0}
    assert optimize_settings({"LAZYBUILD_OPTIMIZE_CMD": '["/app", "--warm"]', "LAZYBUILD_OPTIMIZE_PERIOD": "2.5"}) == \
        {"cmd": ["/app", "--warm"], "period": 2.5}
    assert optimize_settings({"LAZYBUILD_OPTIMIZE_CMD": "cat /etc/os-release"})["cmd"] == \
        ["/bin/sh", "-c", "cat /etc/os-release"]
    for bad, message in (({"LAZYBUILD_OPTIMIZE_CMD": "[1, 2]"}, "JSON array of strings"),
                         ({"LAZYBUILD_OPTIMIZE_CMD": "[nope"}, "not a JSON array"),
                         ({"LAZYBUILD_OPTIMIZE": "1", "LAZYBUILD_OPTIMIZE_PERIOD": "0"}, "more than 0"),
                         ({"LAZYBUILD_OPTIMIZE": "1", "LAZYBUILD_OPTIMIZE_PERIOD": "a while"}, "want seconds")):
        with pytest.raises(DockerfileError, match=message):
            optimize_settings(bad)
