"""References and platforms as Docker users write them (no services needed)."""

import pytest

from lazybuild.image import Index, Descriptor, Platform
from lazybuild.registry import Reference
from lazybuild.registry.auth import parse_challenge


@pytest.mark.parametrize("text,host,repo,tag,digest", [
    ("ubuntu", "docker.io", "library/ubuntu", "latest", ""),
    ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", ""),
    ("user/app", "docker.io", "user/app", "latest", ""),
    ("localhost/app:1", "localhost", "app", "1", ""),
    ("127.0.0.1:5000/a/b/c:v", "127.0.0.1:5000", "a/b/c", "v", ""),
    ("ghcr.io/o/r@sha256:" + "a" * 64, "ghcr.io", "o/r", "", "sha256:" + "a" * 64),
    ("reg.example:443/x:t@sha256:" + "b" * 64, "reg.example:443", "x", "t", "sha256:" + "b" * 64),
])
def test_reference_parsing(text, host, repo, tag, digest):
    r = Reference.parse(text)
    assert (r.host, r.repository, r.tag, r.digest) == (host, repo, tag, digest)
    assert Reference.parse(str(r)) == r


def test_bad_references_say_why():
    with pytest.raises(ValueError, match="lowercase"):
        Reference.parse("Ubuntu")
    with pytest.raises(ValueError, match="digest"):
        Reference.parse("x@sha256:zz")
    assert Reference.parse("docker.io/library/x").api_host == "registry-1.docker.io"
    assert Reference.parse("127.0.0.1:5000/x").is_loopback and not Reference.parse("example.com/x").is_loopback


def test_platform_selection_from_an_index():
    d = lambda p: Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + str(len(p)) * 64, 1,
                             platform=Platform.parse(p))
    index = Index.build([d("linux/amd64"), d("linux/arm/v7"), d("linux/arm64/v8")])
    assert index.select(Platform.parse("linux/arm64")).platform == Platform("linux", "arm64")
    assert index.select(Platform.parse("linux/arm/v7")).platform.variant == "v7"
    with pytest.raises(LookupError, match="linux/s390x.*--platform"):
        index.select(Platform.parse("linux/s390x"))


def test_www_authenticate_parsing():
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"')
    assert scheme == "bearer" and params == {"realm": "https://auth.example/token", "service": "registry",
                                             "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
