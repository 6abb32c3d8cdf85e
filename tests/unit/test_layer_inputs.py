"""The layer writer's output depends on the tar alone: not on how the input tar is compressed, not on the
number of workers. (The blobs themselves are checked against the reference in integration/test_interop.py.)"""

from __future__ import annotations

import os

import zstandard
from zlib_ng import zlib_ng

from lazybuild.estargz import build
from support import tarcases


def test_compressed_inputs_give_the_same_layer(tars, tmp_path):
    """gzip and zstd input tars are sniffed and give byte-identical output to the plain tar."""
    plain = tars["ustar"]
    with open(plain, "rb") as f:
        data = f.read()
    gz = tmp_path / "in.tar.gz"
    c = zlib_ng.compressobj(6, zlib_ng.DEFLATED, 31)
    gz.write_bytes(c.compress(data) + c.flush())
    zst = tmp_path / "in.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(data))
    digests = set()
    for src in (plain, str(gz), str(zst)):
        out = tmp_path / (os.path.basename(src) + ".blob")
        with open(out, "wb") as f:
            digests.add(build(src, f, chunk_size=tarcases.CHUNK).digest)
    assert len(digests) == 1


def test_output_does_not_depend_on_worker_count(tars, tmp_path):
    digests = set()
    for workers in (1, 2, 5):
        with open(tmp_path / f"w{workers}", "wb") as f:
            digests.add(build(tars["many"], f, workers=workers).digest)
    assert len(digests) == 1
