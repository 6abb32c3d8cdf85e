"""lazybuild.localregistry: one image of an OCI layout served read-only on loopback, read by our own registry
client as the mounter reads it (ranges, multi-range, tails, whole blobs), and what it refuses to serve."""

from __future__ import annotations

import io
import json
import os

import httpx
import pytest

from lazybuild.image import Descriptor, Manifest
from lazybuild.layout import OCILayout
from lazybuild.localregistry import LocalRegistry, _parse_ranges
from lazybuild.registry import Reference, Registry


@pytest.fixture()
def served(tmp_path):
    layout = OCILayout(str(tmp_path / "layout"), create=True)
    blob = os.urandom(300_000)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    other = layout.put_bytes(b"not part of the image")
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layout.put_bytes(blob), len(blob))
    cfg = Descriptor("application/vnd.oci.image.config.v1+json", layout.put_bytes(config), len(config))
    manifest = Manifest.build(cfg, [layer], media_type="application/vnd.oci.image.manifest.v1+json")
    layout.put_bytes(manifest.raw)
    with LocalRegistry(layout, manifest) as reg:
        yield reg, blob, layer, other


def test_the_mounter_reads_through_our_client(served):
    reg, blob, layer, _ = served
    ref = Reference.parse(reg.reference)
    with Registry(ref.host) as client:
        resolved = client.resolve(ref)
        assert resolved.manifest.digest == reg.manifest.digest
        ranges = [(0, 10), (4096, 9000), (200_000, 200_001), (299_990, 300_000)]
        assert client.read_ranges(ref.repository, layer.digest, ranges) == [blob[a:b] for a, b in ranges]
        assert client.read_tail(ref.repository, layer.digest, 100) == (len(blob), blob[-100:])
        assert b"".join(client.stream_range(ref.repository, layer.digest, 1000, 250_000)) == blob[1000:250_000]
        out = io.BytesIO()
        client.fetch_blob(ref.repository, layer.digest, out, size=layer.size)
        assert out.getvalue() == blob


def test_only_the_image_is_served(served):
    reg, _, layer, other = served
    base = f"http://{reg.host}/v2/"
    with httpx.Client() as c:
        assert c.get(base).status_code == 200
        assert c.get(f"{base}{reg.repository}/blobs/{other}").status_code == 404  # in the layout, not the image
        assert c.get(f"{base}local/guess/blobs/{layer.digest}").status_code == 404  # the repository is a secret
        assert c.get(f"{base}{reg.repository}/blobs/../../../../etc/passwd").status_code == 404
        assert c.get(f"{base}{reg.repository}/manifests/other-tag").status_code == 404
        assert c.post(f"{base}{reg.repository}/blobs/uploads/").status_code == 501  # read-only
        bad = c.get(f"{base}{reg.repository}/blobs/{layer.digest}", headers={"Range": "bytes=999999999-"})
        assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{layer.size}"


@pytest.mark.parametrize("header,expected", [
    ("", []),
    ("items=0-1", []),
    ("bytes=0-9", [(0, 10)]),
    ("bytes=5-", [(5, 100)]),
    ("bytes=-10", [(90, 100)]),
    ("bytes=-1000", [(0, 100)]),
    ("bytes=0-1000", [(0, 100)]),
    ("bytes=0-1, 50-59", [(0, 2), (50, 60)]),
    ("bytes=100-", None),
    ("bytes=9-3", None),
    ("bytes=-", None),
    ("bytes=a-b", None),
    ("bytes=" + ",".join(["0-0"] * 257), None),
])
def test_range_headers(header, expected):
    assert _parse_ranges(header, 100) == expected
