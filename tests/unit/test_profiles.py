"""Build profiles (lazybuild/profiles.py): the model's parser refuses anything but a well-formed, bounded
profile (it comes from registries: hostile input), merging never grows past the caps, and the local store
names files only by checked digests."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazybuild.digest import InvalidDigest
from lazybuild.errors import DataError
from lazybuild.profiles import (MAX_FILES, MAX_PROFILE_BYTES, MEDIA_TYPE, Profile, ProfileError, ProfileStore,
                                Subject, artifact_manifest, profile_tag)

BASE = "sha256:" + "a" * 64
L0, L1 = "sha256:" + "0" * 64, "sha256:" + "1" * 64


def doc(**over) -> dict:
    d = {"schemaVersion": 1, "mediaType": MEDIA_TYPE, "base": BASE,
         "layers": [{"digest": L0, "files": ["bin/sh", "usr/lib/x.so"]}, {"digest": L1, "files": ["etc/passwd"]}]}
    d.update(over)
    return d


def raw(d) -> bytes:
    return json.dumps(d).encode()


def test_round_trip_keeps_layers_and_first_read_order():
    p = Profile.parse(raw(doc()))
    assert p.base == BASE and list(p.layers) == [L0, L1]
    assert p.layers[L0] == ["bin/sh", "usr/lib/x.so"] and p.file_count == 3
    assert Profile.parse(p.to_bytes()) == p


@pytest.mark.parametrize("bad, says", [
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b"{" * 100_000 + b"}" * 100_000, "not JSON"),
    (raw(doc(schemaVersion="1")), "schemaVersion"),
    (raw(doc(schemaVersion=True)), "schemaVersion"),
    (raw(doc(mediaType="application/json")), "mediaType"),
    (raw(doc(base="sha256:../../etc/shadow")), "not a sha256 digest"),
    (raw(doc(base=None)), "not a sha256 digest"),
    (raw(doc(extra=1)), "unknown fields"),
    (raw(doc(layers={"a": 1})), "not a list"),
    (raw(doc(layers=[{"digest": "sha256:" + "A" * 64, "files": []}])), "not a sha256 digest"),
    (raw(doc(layers=[{"digest": L0, "files": "bin/sh"}])), "files is not a list"),
    (raw(doc(layers=[{"digest": L0, "files": [1]}])), "not a string"),
    (raw(doc(layers=[{"digest": L0}])), "exactly digest and files"),
    (raw(doc(layers=[{"digest": L0, "files": ["../../etc/shadow"]}])), "not a normalized name"),
    (raw(doc(layers=[{"digest": L0, "files": ["usr/../../x"]}])), "not a normalized name"),
    (raw(doc(layers=[{"digest": L0, "files": ["/etc/shadow"]}])), "not a normalized name"),
    (raw(doc(layers=[{"digest": L0, "files": ["a//b"]}])), "not a normalized name"),
    (raw(doc(layers=[{"digest": L0, "files": ["a\0b"]}])), "not a normalized name"),
    (raw(doc(layers=[{"digest": L0, "files": [""]}])), "file name of 0 bytes"),
    (raw(doc(layers=[{"digest": L0, "files": ["x" * 5000]}])), "file name of 5000 bytes"),
    (raw(doc(layers=[{"digest": L0, "files": ["\ud800"]}])), "not valid text"),
    (raw(doc(layers=[{"digest": L0, "files": ["a", "a"]}])), "listed twice"),
    (raw(doc(layers=[{"digest": L0, "files": []}, {"digest": L0, "files": []}])), "listed twice"),
    (raw(doc(layers=[{"digest": L0, "files": [f"f{i}" for i in range(MAX_FILES + 1)]}])), "cap of"),
    (raw(doc(layers=[{"digest": L0, "files": []}] * 300)), "over the cap"),
    (b" " * (MAX_PROFILE_BYTES + 1), "byte cap"),
])
def test_hostile_profiles_are_refused_with_a_data_error(bad, says):
    with pytest.raises(ProfileError, match=says) as e:
        Profile.parse(bad, "profile X")
    assert isinstance(e.value, DataError) and "profile X" in str(e.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: (st.lists(inner, max_size=5)
                                   | st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parser_never_crashes_on_arbitrary_json(value):
    try:
        Profile.parse(json.dumps(value).encode())
    except ProfileError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"schemaVersion": st.just(1), "mediaType": st.just(MEDIA_TYPE), "base": st.just(BASE)},
                             optional={"layers": st.lists(st.fixed_dictionaries(
                                 {"digest": st.sampled_from([L0, L1, "sha256:x", 3]),
                                  "files": st.lists(st.text(max_size=12) | st.integers(), max_size=6)}), max_size=3)}))
def test_parser_never_crashes_on_near_valid_profiles(value):
    try:
        p = Profile.parse(json.dumps(value).encode())
    except ProfileError:
        return
    for files in p.layers.values():  # what it accepts is only normalized names
        assert all(f and not f.startswith("/") and ".." not in f.split("/") for f in files)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_crashes_on_arbitrary_bytes(data):
    try:
        Profile.parse(data)
    except ProfileError:
        pass


def test_merge_appends_new_reads_in_order_and_skips_bad_ones():
    p = Profile.parse(raw(doc()))
    m = p.merged([(L0, "bin/sh"), (L1, "etc/group"), ("sha256:nope", "x"), (L0, "../x"), (L0, "usr/bin/cc"),
                  ("sha256:" + "2" * 64, "new/layer")])
    assert m.layers[L0] == ["bin/sh", "usr/lib/x.so", "usr/bin/cc"]
    assert m.layers[L1] == ["etc/passwd", "etc/group"]
    assert m.layers["sha256:" + "2" * 64] == ["new/layer"]
    assert p.file_count == 3  # the original is unchanged


def test_merge_never_grows_past_the_caps():
    p = Profile(BASE).merged((L0, f"f{i}") for i in range(MAX_FILES + 500))
    assert p.file_count == MAX_FILES
    long_names = ((L0, f"{i:08d}" + "n" * 3000) for i in range(2000))
    big = Profile(BASE).merged(long_names)
    assert len(big.to_bytes()) <= MAX_PROFILE_BYTES
    Profile.parse(big.to_bytes())  # what merging makes, parsing takes


def test_store_saves_atomically_lists_and_removes(tmp_path):
    store = ProfileStore(str(tmp_path))
    assert store.load(BASE) is None and store.list() == []
    p = Profile.parse(raw(doc()))
    path = store.save(p)
    assert path == str(tmp_path / "profiles" / f"sha256-{'a' * 64}.json")
    assert os.listdir(tmp_path / "profiles") == [os.path.basename(path)]  # no temporary left
    assert store.load(BASE) == p
    (tmp_path / "profiles" / f"sha256-{'b' * 64}.json").write_text("{not json")
    (tmp_path / "profiles" / "unrelated.txt").write_text("x")
    listed = {sp.base: sp for sp in store.list()}
    assert set(listed) == {BASE, "sha256:" + "b" * 64}
    assert listed[BASE].profile.file_count == 3 and listed["sha256:" + "b" * 64].error
    assert store.remove(BASE) and not store.remove(BASE)


def test_store_checks_digests_before_they_name_files(tmp_path):
    store = ProfileStore(str(tmp_path))
    for bad in ("sha256:../../etc/shadow", "../x", "sha256:" + "A" * 64):
        with pytest.raises(InvalidDigest):
            store.path(bad)
        with pytest.raises(InvalidDigest):
            store.remove(bad)


def test_a_stored_profile_of_another_base_is_refused(tmp_path):
    store = ProfileStore(str(tmp_path))
    store.save(Profile.parse(raw(doc())))
    os.rename(store.path(BASE), store.path(L0))
    with pytest.raises(ProfileError, match="is of base"):
        store.load(L0)


def test_the_artifact_names_its_subject_and_the_fallback_tag():
    p = Profile.parse(raw(doc()))
    m = json.loads(artifact_manifest(p, Subject("application/vnd.oci.image.manifest.v1+json", BASE, 1234)))
    assert m["artifactType"] == MEDIA_TYPE and m["subject"] == {
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": BASE, "size": 1234}
    assert m["config"]["mediaType"] == "application/vnd.oci.empty.v1+json" and len(m["layers"]) == 1
    assert m["layers"][0]["size"] == len(p.to_bytes())
    assert profile_tag(BASE) == f"sha256-{'a' * 64}.lzprofile"
