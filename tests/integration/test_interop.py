"""Byte-level interoperability with stargz-snapshotter's estargz library (the reference, via estargz-oracle).

For every input case, gzip and zstd, with and without a prioritized list:
1. our blob passes the reference's verification against our TOC digest, and lists as the reference's own;
2. the reference's blob is opened, verified and extracted by us with identical content and metadata;
3. with the same prioritized list, our file order is the reference's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest
import zstandard
from zlib_ng import zlib_ng

from lazybuild.estargz import LayerReader, build, extract
from support import tarcases
from support.listing import dir_listing, oracle_listing, reader_listing

COMPRESSIONS = ["gzip", "zstd"]


class Blobs:
    """Our blob and the reference's for one (case, compression, prioritized) triple, built once."""

    def __init__(self, oracle, tars, tmp_path_factory):
        self.oracle, self.tars, self.tmp = oracle, tars, tmp_path_factory
        self._cache = {}

    def get(self, case: str, comp: str, prio: bool):
        key = (case, comp, prio)
        if key not in self._cache:
            d = self.tmp.mktemp(f"{case}-{comp}-{'prio' if prio else 'plain'}")
            prioritized = tarcases.PRIORITIZED[case] if prio else []
            ours = str(d / "ours.blob")
            with open(ours, "wb") as out:
                blob = build(self.tars[case], out, compression=comp, chunk_size=tarcases.CHUNK,
                             prioritized_files=prioritized, allow_prioritized_not_found=True)
            ref = str(d / "ref.blob")
            cmd = [self.oracle, "build", "-chunk", str(tarcases.CHUNK)]
            if comp == "zstd":
                cmd.append("-zstd")
            if prio:
                (d / "prio.txt").write_text("\n".join(prioritized) + "\n", encoding="utf-8")
                cmd += ["-prio", str(d / "prio.txt")]
            p = subprocess.run(cmd + [self.tars[case], ref], capture_output=True, text=True, check=True)
            self._cache[key] = (ours, blob, ref, json.loads(p.stdout), d)
        return self._cache[key]


@pytest.fixture(scope="session")
def blobs(oracle, tars, tmp_path_factory) -> Blobs:
    return Blobs(oracle, tars, tmp_path_factory)


def _params():
    return [pytest.param(c, comp, prio, id=f"{c}-{comp}-{'prio' if prio else 'plain'}")
            for c in tarcases.CASES for comp in COMPRESSIONS for prio in (False, True)]


@pytest.mark.parametrize("case,comp,prio", _params())
def test_our_blob_verifies_and_lists_as_the_reference(blobs, oracle, case, comp, prio):
    ours, blob, ref, ref_meta, _ = blobs.get(case, comp, prio)
    mine = oracle_listing(oracle, ours, blob.toc_digest)  # fails unless the TOC digest and every chunk verify
    theirs = oracle_listing(oracle, ref, ref_meta["tocDigest"])
    assert mine == theirs


@pytest.mark.parametrize("case,comp,prio", _params())
def test_we_read_verify_and_extract_the_reference_blob(blobs, oracle, case, comp, prio):
    _, _, ref, ref_meta, d = blobs.get(case, comp, prio)
    expected = oracle_listing(oracle, ref)
    with LayerReader.open_file(ref) as r:
        assert r.toc_digest == ref_meta["tocDigest"]
        r.verify(ref_meta["tocDigest"])
        assert reader_listing(r) == expected
        out = d / "extracted"
        warnings = extract(r, str(out))
    assert warnings == []
    assert dir_listing(str(out)) == expected


@pytest.mark.parametrize("case,comp", [(c, comp) for c in tarcases.CASES for comp in COMPRESSIONS])
def test_prioritized_order_is_the_references(blobs, oracle, case, comp):
    ours, _, ref, _, _ = blobs.get(case, comp, True)
    order = lambda b: subprocess.run([oracle, "order", b], capture_output=True, text=True, check=True).stdout
    assert order(ours) == order(ref)
    assert ".prefetch.landmark" in order(ours)


def _decompress_all(path: str, comp: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if comp == "gzip":
        out, rest = [], data
        while rest:
            d = zlib_ng.decompressobj(31)
            out.append(d.decompress(rest))
            rest = d.unused_data
        return b"".join(out)
    return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()


@pytest.mark.parametrize("case,comp", [(c, comp) for c in tarcases.CASES for comp in COMPRESSIONS])
def test_blob_digests_are_what_the_writer_reported(blobs, case, comp):
    ours, blob, _, _, _ = blobs.get(case, comp, False)
    with open(ours, "rb") as f:
        raw = f.read()
    assert blob.size == len(raw) and blob.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    stream = _decompress_all(ours, comp)
    assert blob.diff_id == "sha256:" + hashlib.sha256(stream).hexdigest()
    assert blob.uncompressed_size == len(stream)
    assert blob.annotations["io.containers.estargz.uncompressed-size"] == str(len(stream))
    # The decompressed stream is an ordinary tar that any tool reads.
    import io

    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(stream), mode="r:")]
    assert names[0] == ".no.prefetch.landmark"
    if comp == "gzip":
        assert names[-1] == "stargz.index.json" and stream.endswith(b"\0" * 1024)
