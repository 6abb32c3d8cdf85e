"""Bad blobs and hostile tars: a specific error naming layer and entry, never bad bytes, never a write outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from zlib_ng import zlib_ng

from lazybuild.estargz import (
    ChunkDigestMismatch,
    FooterError,
    FormatError,
    LayerReader,
    TOCDigestMismatch,
    UnsafeEntryError,
    convert_file,
    extract,
)
from lazybuild.estargz.compression import Gzip
from test_format import convert, make_tar

import tarfile


def _write_blob(dest: str, head: bytes, doc: dict) -> None:
    with open(dest, "wb") as f:
        f.write(head)
        f.add_raw = lambda raw: None
        Gzip().write_trailer(f, len(head), [json.dumps(doc, indent="\t").encode()])


def rewrite_toc(src: str, dest: str, mutate) -> None:
    """A blob with the same payload members and a TOC changed by `mutate(entries)` (a hostile layer)."""
    with LayerReader.open_file(src) as r:
        doc, toc_offset = json.loads(LayerReader.fetch_toc(r.blob)[2]), r.toc_offset
    mutate(doc["entries"])
    with open(src, "rb") as f:
        _write_blob(dest, f.read(toc_offset), doc)


def corrupt_payload_of(path: str, name: str) -> str:
    """Replace the member of `name` by a valid gzip member of *other* bytes (only the digest can tell)."""
    with LayerReader.open_file(path) as r:
        start, end = r.compressed_range(r.chunk_for(name, 0))
        doc, toc_offset = json.loads(LayerReader.fetch_toc(r.blob)[2]), r.toc_offset
    with open(path, "rb") as f:
        raw = f.read()
    plain = bytearray(zlib_ng.decompressobj(31).decompress(raw[start:end]))
    plain[0] ^= 0xFF
    c = zlib_ng.compressobj(6, zlib_ng.DEFLATED, 31)
    member = c.compress(bytes(plain)) + c.flush()
    for e in doc["entries"]:  # keep later offsets right, so only the content is wrong
        if e.get("offset", 0) > start:
            e["offset"] += len(member) - (end - start)
    bad = path + ".corrupt"
    _write_blob(bad, raw[:start] + member + raw[end:toc_offset], doc)
    return bad


@pytest.fixture
def good(tmp_path):
    out, blob = convert(tmp_path, [("etc/", None, {}), ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n" * 300, {}),
                                   ("etc/other", b"other\n", {})])
    return out, blob


def test_truncated_blob_and_foreign_footer(good, tmp_path):
    out, _ = good
    with open(out, "rb") as f:
        raw = f.read()
    for cut in (10, 51, len(raw) // 2):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(raw[:-cut])
        with pytest.raises(FormatError, match=str(p)):
            LayerReader.open_file(str(p))
    plain = tmp_path / "plain.tar.gz"
    c = zlib_ng.compressobj(6, zlib_ng.DEFLATED, 31)
    plain.write_bytes(c.compress(b"\0" * 10240) + c.flush())
    with pytest.raises(FooterError, match="not an eStargz layer"):
        LayerReader.open_file(str(plain))


def test_toc_digest_mismatch(good):
    out, blob = good
    with LayerReader.open_file(out) as r:
        r.verify(blob.toc_digest)
        with pytest.raises(TOCDigestMismatch, match=out):
            r.verify("sha256:" + "0" * 64)


def test_corrupt_chunk_is_never_served(good, tmp_path):
    out, _ = good
    bad = corrupt_payload_of(out, "etc/passwd")
    with LayerReader.open_file(bad) as r:
        with pytest.raises(ChunkDigestMismatch, match="etc/passwd"):
            r.read_file("etc/passwd")
        with pytest.raises(ChunkDigestMismatch, match="etc/passwd"):
            r.verify()
        assert r.read_file("etc/other") == b"other\n"  # the rest of the layer still reads
        dest = tmp_path / "x"
        with pytest.raises(ChunkDigestMismatch):
            extract(r, str(dest))
    assert not (dest / "etc" / "passwd").exists()
    assert [n for n in os.listdir(dest / "etc") if n.startswith(".lazybuild")] == []


def test_names_that_escape_the_root_are_refused(good, tmp_path):
    out, _ = good
    for i, (field, value) in enumerate([("name", "../escape"), ("name", "etc/../../escape")]):
        bad = str(tmp_path / f"esc{i}")
        rewrite_toc(out, bad, lambda es: es[-1].__setitem__(field, value))
        with pytest.raises(UnsafeEntryError, match="escapes the layer root"):
            LayerReader.open_file(bad)

    def hardlink_out(entries):
        entries.append({"name": "etc/hl", "type": "hardlink", "linkName": "../../etc/shadow"})

    bad = str(tmp_path / "hl")
    rewrite_toc(out, bad, hardlink_out)
    with pytest.raises(UnsafeEntryError, match="hardlink"):
        LayerReader.open_file(bad)


def test_writer_refuses_escaping_tar_names_and_leaves_no_output(tmp_path):
    src = make_tar(tmp_path / "evil.tar", [("../evil", b"x", {})])
    dest = tmp_path / "out.blob"
    with pytest.raises(UnsafeEntryError, match="evil"):
        convert_file(src, str(dest))
    assert os.listdir(tmp_path) == ["evil.tar"]  # no OUT, no .partial left behind


def test_extract_never_writes_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out, _ = convert(tmp_path, [("a", None, {"type": tarfile.SYMTYPE, "linkname": str(outside)}),
                                ("a/pwned", b"x", {})])
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeEntryError, match="symlink"):
        with LayerReader.open_file(out) as r:  # refused when the TOC is read...
            extract(r, str(dest))
    assert os.listdir(outside) == []
    # ...and a symlink already in the destination is replaced by the layer's directory, never followed.
    out, _ = convert(tmp_path, [("a/pwned", b"x", {})], name="second")
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    os.symlink(outside, dest2 / "a")
    with LayerReader.open_file(out) as r:
        extract(r, str(dest2))
    assert os.listdir(outside) == []
    assert not os.path.islink(dest2 / "a") and (dest2 / "a" / "pwned").read_bytes() == b"x"


def test_absolute_names_land_inside_the_destination(tmp_path):
    out, _ = convert(tmp_path, [("/abs/", None, {}), ("/abs/file", b"inside", {})])
    dest = tmp_path / "dest"
    with LayerReader.open_file(out) as r:
        assert extract(r, str(dest)) == []
    assert (dest / "abs" / "file").read_bytes() == b"inside"


def test_cli_names_layer_and_entry(good, tmp_path):
    out, blob = good
    bad = corrupt_payload_of(out, "etc/passwd")
    p = subprocess.run([sys.executable, "-I", "-m", "lazybuild.cli", "layer", "verify", bad], capture_output=True, text=True)
    assert p.returncode == 1 and bad in p.stderr and "etc/passwd" in p.stderr and "Traceback" not in p.stderr
    error, hint = p.stderr.splitlines()  # what is wrong, then what to try
    assert error.startswith("lazybuild: error: ") and hint.startswith("lazybuild: hint: ")
    p = subprocess.run([sys.executable, "-I", "-m", "lazybuild.cli", "layer", "verify", out, "--toc-digest", "sha256:00"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "TOC digest" in p.stderr
