"""KeptBlobsSource: a blob fetched once is kept and served from the kept copy; a kept copy that no longer
matches its digest is dropped and fetched again; a source that lies is never kept."""

import io
import os

import pytest

from lazybuild.image import Descriptor, sha256_digest
from lazybuild.layout import OCILayout
from lazybuild.transfer import KeptBlobsSource, OCISource, Source, TransferError


class Counting(Source):
    def __init__(self, inner: Source):
        self.inner, self.fetches = inner, 0

    def manifests(self, platform, all_platforms):
        return self.inner.manifests(platform, all_platforms)

    def fetch(self, desc, out, progress=None):
        self.fetches += 1
        self.inner.fetch(desc, out, progress)


def _layout_with(tmp_path, data: bytes) -> tuple[OCISource, Descriptor]:
    layout = OCILayout(str(tmp_path / "src"), create=True)
    digest = layout.put_bytes(data)
    return OCISource(layout.root, ""), Descriptor("application/octet-stream", digest, len(data))


def test_fetched_once_then_from_the_kept_copy_and_a_torn_copy_is_fetched_again(tmp_path):
    data = os.urandom(300_000)
    src, desc = _layout_with(tmp_path, data)
    counting = Counting(src)
    kept = KeptBlobsSource(counting, str(tmp_path / "kept"))
    for _ in range(3):
        out = io.BytesIO()
        kept.fetch(desc, out)
        assert out.getvalue() == data
    assert counting.fetches == 1
    path = kept.layout.blob_path(desc.digest)
    with open(path, "r+b") as f:
        f.write(b"\0" * 10)
    out = io.BytesIO(b"x")
    out.seek(1)
    kept.fetch(desc, out)
    assert out.getvalue() == b"x" + data and counting.fetches == 2


def test_a_source_whose_bytes_do_not_match_is_not_kept(tmp_path):
    src, desc = _layout_with(tmp_path, b"real")
    with open(src.layout.blob_path(desc.digest), "wb") as f:
        f.write(b"fake")
    kept = KeptBlobsSource(src, str(tmp_path / "kept"))
    with pytest.raises(TransferError):
        kept.fetch(desc, io.BytesIO())
    assert not kept.layout.has_blob(desc.digest)
    assert sha256_digest(b"real") == desc.digest
