"""The byte layout facts of reference/estargz.md, checked on our own output without the reference."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile

import pytest
from zlib_ng import zlib_ng

from lazybuild.estargz import LayerReader, PrioritizedFileNotFound, build
from lazybuild.estargz.compression import gzip_footer, parse_gzip_footer, parse_legacy_footer
from lazybuild.estargz.reader import FileBlob
from lazybuild.estargz.toc import TOCEntry, format_modtime, toc_json

CHUNK = 4096


def make_tar(path, entries):
    """entries: (name, data|None, attrs) tuples; data None means a directory unless attrs say otherwise."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.mtime = attrs.pop("mtime", 1600000000)
            info.type = attrs.pop("type", tarfile.DIRTYPE if data is None else tarfile.REGTYPE)
            for k, v in attrs.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def convert(tmp_path, entries, name="out.blob", **options):
    src = make_tar(tmp_path / (name + ".tar"), entries)
    out = tmp_path / name
    with open(out, "wb") as f:
        blob = build(src, f, chunk_size=CHUNK, **options)
    return str(out), blob


def toc_of(path) -> list[dict]:
    with LayerReader.open_file(path) as r:
        return json.loads(LayerReader.fetch_toc(r.blob)[2])["entries"]


def test_footer_bytes_are_the_verified_ones():
    # reference/estargz.md §1.4, verified hex for tocOffset=0x284
    assert gzip_footer(0x284).hex() == (
        "1f8b08040000000000ff1a00534716003030303030303030303030303032383453544152475a010000ffff0000000000000000"
    )
    assert parse_gzip_footer(gzip_footer(644)) == 644
    legacy = bytes.fromhex(
        "1f8b08040000000000ff16003030303030303030303030303032383453544152475a010000ffff0000000000000000"
    )
    assert len(legacy) == 47 and parse_legacy_footer(legacy) == 644


def test_toc_json_is_gos_marshal_indent():
    e = TOCEntry(name="a<b>&c\u2028", type="reg", size=3, mode=0o644, digest="sha256:x", xattrs={"user.k": b"bar"})
    raw = toc_json([e])
    assert raw == (
        b'{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": "a\\u003cb\\u003e\\u0026c\\u2028",\n'
        b'\t\t\t"type": "reg",\n\t\t\t"size": 3,\n\t\t\t"mode": 420,\n\t\t\t"xattrs": {\n\t\t\t\t"user.k": "YmFy"\n'
        b'\t\t\t},\n\t\t\t"digest": "sha256:x"\n\t\t}\n\t]\n}'
    )


def test_modtime_is_rounded_and_epoch_omitted():
    assert format_modtime(0) == "" and format_modtime(0.4) == ""
    assert format_modtime(1577934305.5) == "2020-01-02T03:05:06Z"
    assert format_modtime(1577934305.49) == "2020-01-02T03:05:05Z"


def test_header_in_previous_member_payload_at_offset(tmp_path):
    payload = b"0123456789" * 50
    out, _ = convert(tmp_path, [("etc/", None, {}), ("etc/file", payload, {"mode": 0o644})])
    with open(out, "rb") as f:
        raw = f.read()
    ent = next(e for e in toc_of(out) if e["name"] == "etc/file")
    # The member at `offset` starts with the payload itself...
    d = zlib_ng.decompressobj(31)
    assert d.decompress(raw[ent["offset"]:]).startswith(payload)
    # ...and the file's tar header ends the member before it.
    prev_start = next(e for e in toc_of(out) if e["name"] == ".no.prefetch.landmark")["offset"]
    d = zlib_ng.decompressobj(31)
    prev = d.decompress(raw[prev_start:ent["offset"]])
    assert d.eof and prev[-512:][:8] == b"etc/file"


def test_chunk_size_quirks_and_empty_files(tmp_path):
    out, _ = convert(tmp_path, [
        ("exact", b"a" * CHUNK, {}), ("double", b"b" * 2 * CHUNK, {}), ("plus1", b"c" * (CHUNK + 1), {}),
        ("small", b"d" * 10, {}), ("empty", b"", {}),
    ])
    toc = toc_of(out)
    by = lambda name: [e for e in toc if e["name"] == name or (e["type"] == "chunk" and e["name"] == name)]
    assert by("exact")[0]["chunkSize"] == CHUNK and len(by("exact")) == 1
    double = by("double")
    assert [e.get("chunkSize") for e in double] == [CHUNK, CHUNK]  # last chunk keeps it: exact multiple
    plus1 = by("plus1")
    assert [e.get("chunkSize") for e in plus1] == [CHUNK, None] and plus1[1]["chunkOffset"] == CHUNK
    assert "chunkSize" not in by("small")[0]
    empty = by("empty")[0]
    assert empty["digest"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert "offset" not in empty and "chunkDigest" not in empty


def test_landmarks_and_prioritized_order(tmp_path):
    entries = [("a/", None, {}), ("a/one", b"1" * 100, {}), ("b/", None, {}), ("b/two", b"2" * 100, {}),
               ("c", b"3" * 100, {})]
    out, _ = convert(tmp_path, list(entries), name="plain")
    toc = toc_of(out)
    assert toc[0]["name"] == ".no.prefetch.landmark" and toc[0]["size"] == 1 and "mode" not in toc[0]
    out, _ = convert(tmp_path, list(entries), name="prio", prioritized_files=["/b/two", "./c"])
    names = [e["name"] for e in toc_of(out)]
    assert names == ["b/", "b/two", "c", ".prefetch.landmark", "a/", "a/one"]
    with LayerReader.open_file(out) as r:
        assert r.read_file(".prefetch.landmark") == b"\x0f"
        landmark = r.lookup(".prefetch.landmark").entry
        for path in ("b/two", "c"):  # prioritized payloads lie inside the prefetch range [0, landmark)
            assert r.compressed_range(r.chunk_for(path, 0))[1] <= landmark.offset
    with pytest.raises(PrioritizedFileNotFound, match="nope"):
        convert(tmp_path, list(entries), name="missing", prioritized_files=["nope"])


def test_duplicates_last_wins_and_old_landmarks_and_toc_dropped(tmp_path):
    out, _ = convert(tmp_path, [(".no.prefetch.landmark", b"\x0f", {}), ("x", b"old", {}), ("y", b"y", {}),
                                ("x", b"new!", {}), ("stargz.index.json", b"{}", {})])
    names = [e["name"] for e in toc_of(out)]
    assert names == [".no.prefetch.landmark", "y", "x"]
    with LayerReader.open_file(out) as r:
        assert r.read_file("x") == b"new!"


def test_user_and_group_names_written_only_when_they_change(tmp_path):
    out, _ = convert(tmp_path, [("a", b"1", {"uid": 1, "uname": "u1", "gid": 1, "gname": "g1"}),
                                ("b", b"2", {"uid": 1, "uname": "u1", "gid": 1, "gname": "g1"}),
                                ("c", b"3", {"uid": 2, "uname": "u2", "gid": 1, "gname": "g1"})])
    toc = {e["name"]: e for e in toc_of(out)}
    assert toc["a"]["userName"] == "u1" and "userName" not in toc["b"] and toc["c"]["userName"] == "u2"
    with LayerReader.open_file(out) as r:  # the reader carries them forward
        assert r.lookup("b").entry.user_name == "u1" and r.lookup("b").entry.group_name == "g1"


def test_zstd_layout(tmp_path):
    out, blob = convert(tmp_path, [("f", b"z" * 5000, {})], compression="zstd")
    with open(out, "rb") as f:
        raw = f.read()
    footer_frame = raw[-48:]
    assert footer_frame[:4] == b"\x50\x2a\x4d\x18" and struct.unpack("<I", footer_frame[4:8])[0] == 40
    toc_off, comp_len, raw_len, kind = struct.unpack("<QQQQ", footer_frame[8:40])
    assert footer_frame[40:] == b"GnUlInUx" and kind == 1
    assert raw[toc_off - 8:toc_off - 4] == b"\x50\x2a\x4d\x18"
    assert blob.annotations["io.containers.zstd-chunked.manifest-position"] == f"{toc_off}:{comp_len}:{raw_len}:1"
    assert blob.annotations["io.containers.zstd-chunked.manifest-checksum"] == (
        "sha256:" + hashlib.sha256(raw[toc_off:toc_off + comp_len]).hexdigest())
    assert blob.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    with LayerReader.open_file(out) as r:
        assert r.kind == "zstd" and r.toc_digest == blob.toc_digest
        assert r.read_file("f") == b"z" * 5000


def test_legacy_47_byte_footer_is_read(tmp_path):
    out, blob = convert(tmp_path, [("f", b"legacy", {})])
    with open(out, "rb") as f:
        raw = f.read()
    toc_offset = parse_gzip_footer(raw[-51:])
    legacy = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00" + b"%016xSTARGZ" % toc_offset
              + b"\x01\x00\x00\xff\xff" + b"\0" * 8)
    (tmp_path / "legacy.blob").write_bytes(raw[:-51] + legacy)
    with LayerReader.open_file(str(tmp_path / "legacy.blob")) as r:
        r.verify(blob.toc_digest)
        assert r.read_file("f") == b"legacy"


def test_a_chunk_is_served_from_its_compressed_range_alone(tmp_path):
    data = bytes(range(256)) * 64  # 16 KiB: four chunks
    out, _ = convert(tmp_path, [("big", data, {}), ("after", b"x", {})])
    with LayerReader.open_file(out) as r:
        chunk = r.chunk_for("big", 3 * CHUNK + 5)
        assert chunk.chunk_offset == 3 * CHUNK and chunk.chunk_size == CHUNK
        start, end = r.compressed_range(chunk)
        compressed = FileBlob(out).read_at(start, end - start)
        assert r.decode_chunk(chunk, compressed) == data[3 * CHUNK:]
        with pytest.raises(KeyError):
            r.chunk_for("big", len(data))


def test_fast_toc_json_equals_the_generic_encoder():
    from lazybuild.estargz.toc import go_json_indent

    names = ["plain", "ünï/日本", "tab\there", 'quote"back\\slash', "ctl\x01\x1f", "bad-\udcff-utf8", "<&>\u2029"]
    entries = [TOCEntry(name=n, type="reg", size=i, mode=0o644, uid=i, user_name=n, offset=i * 7,
                        xattrs={"user." + n: n.encode("utf-8", "surrogateescape")} if i % 2 else {},
                        digest="sha256:d", chunk_digest="sha256:c") for i, n in enumerate(names)]
    entries.append(TOCEntry(name="x/", type="dir"))
    assert toc_json(entries) == go_json_indent({"version": 1, "entries": [e.to_go_dict() for e in entries]})
    assert toc_json([]) == b'{\n\t"version": 1,\n\t"entries": []\n}'


def test_inner_offset_entries_sharing_one_member(tmp_path):
    """v0.13+ writers (--estargz-min-chunk-size) put small files in one member, found by innerOffset."""
    from lazybuild.estargz.compression import Gzip, tar_padding

    def header(name, size):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = size, 1600000000
        return info.tobuf(tarfile.USTAR_FORMAT)

    a, b = b"first file\n" * 30, b"second\n"
    shared = (b"\x0f" + tar_padding(1) + header("a", len(a)) + a + tar_padding(len(a))
              + header("b", len(b)) + b + tar_padding(len(b)))
    gz = Gzip()
    m0 = gz.compress_member(header(".no.prefetch.landmark", 1))
    m1 = gz.compress_member(shared)
    sha = lambda d: "sha256:" + hashlib.sha256(d).hexdigest()
    inner_a = 512 + 512
    inner_b = inner_a + len(a) + len(tar_padding(len(a))) + 512
    entries = [
        {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": len(m0), "digest": sha(b"\x0f"),
         "chunkDigest": sha(b"\x0f")},
        {"name": "a", "type": "reg", "size": len(a), "offset": len(m0), "innerOffset": inner_a, "digest": sha(a),
         "chunkDigest": sha(a)},
        {"name": "b", "type": "reg", "size": len(b), "offset": len(m0), "innerOffset": inner_b, "digest": sha(b),
         "chunkDigest": sha(b)},
    ]
    path = tmp_path / "inner.blob"
    with open(path, "wb") as f:
        f.write(m0 + m1)
        f.add_raw = lambda raw: None
        gz.write_trailer(f, len(m0) + len(m1), [json.dumps({"version": 1, "entries": entries}).encode()])
    with LayerReader.open_file(str(path)) as r:
        assert r.verify() == 3
        assert r.read_file("a") == a and r.read_file("b") == b
        assert r.compressed_range(r.chunk_for("a", 0)) == r.compressed_range(r.chunk_for("b", 0))


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_decompress_member_returns_only_the_asked_slice(kind):
    from lazybuild.estargz.compression import compression_for, decompress_member

    data = bytes(range(256)) * 40
    member = compression_for(kind).compress_member(data) + compression_for(kind).compress_member(b"next member")
    assert decompress_member(kind, member, 100) == data[:100]
    assert decompress_member(kind, member, 100, skip=5000) == data[5000:5100]
    assert decompress_member(kind, member, 10_000, skip=10_000) == data[10_000:]  # stops at the member's end
    assert decompress_member(kind, member, 10, skip=20_000) == b""
