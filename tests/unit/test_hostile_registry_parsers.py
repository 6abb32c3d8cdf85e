"""What a hostile registry or layout may send, as properties (no services): the manifest parser lets through
only exact digests, and a capped body never returns more than its cap. (Evil registries for real:
integration/test_hostile_registry.py.)"""

from __future__ import annotations

import gzip
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazybuild.digest import is_digest
from lazybuild.image import OCI_INDEX, OCI_MANIFEST, Index, Manifest, parse_manifest_or_index
from lazybuild.registry.bodies import BodyError, read_capped

_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=80),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                     max_leaves=20)
_digestish = st.one_of(st.just("sha256:" + "a" * 64), st.text(max_size=80), st.integers(),
                       st.from_regex(r"sha256:[0-9a-fA-F./]{60,70}", fullmatch=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_json, layers=st.lists(st.fixed_dictionaries({"digest": _digestish, "size": _json}, optional={
    "mediaType": _json, "annotations": _json, "platform": _json, "urls": _json}), max_size=3), top=_json)
def test_manifest_parser_lets_through_only_exact_digests(config, layers, top):
    """Whatever JSON a registry or layout sends, parsing raises ValueError or gives descriptors whose
    digests are exact sha256 and sizes non-negative integers (nothing else may name a file or URL)."""
    for doc in ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers},
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": layers},
                {"schemaVersion": 2, "config": {"digest": "sha256:" + "b" * 64, "size": 1}, "layers": top}):
        try:
            parsed = parse_manifest_or_index(json.dumps(doc).encode())
        except ValueError:
            continue
        descs = parsed.manifests if isinstance(parsed, Index) else [parsed.config, *parsed.layers]
        assert isinstance(parsed, (Index, Manifest))
        for d in descs:
            assert is_digest(d.digest) and isinstance(d.size, int) and d.size >= 0


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=4096) | st.integers(0, 20000).map(lambda n: b"\0" * n), cap=st.integers(1, 5000),
       encoding=st.sampled_from(["", "identity", "gzip", "deflate"]), announce=st.booleans())
def test_read_capped_never_returns_more_than_its_cap(body, cap, encoding, announce):
    import zlib

    wire = {"": body, "identity": body, "gzip": gzip.compress(body), "deflate": zlib.compress(body)}[encoding]
    headers = {"Content-Encoding": encoding} if encoding else {}
    if announce:
        headers["Content-Length"] = str(len(wire))
    r = httpx.Response(200, headers=headers, stream=httpx.ByteStream(wire), request=httpx.Request("GET", "http://x/"))
    try:
        got = read_capped(r, cap, "test", "tests")
    except BodyError as e:
        assert len(body) > cap or (announce and len(wire) > cap), (len(body), cap)
        assert "cap for tests" in str(e)
    else:
        assert got == body and len(got) <= cap
