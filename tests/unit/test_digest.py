"""The one digest check: `sha256:` + 64 lowercase hex, nothing else (it guards every digest that names a file)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazybuild.digest import InvalidDigest, check_digest, is_digest

EXACT = re.compile(r"sha256:[0-9a-f]{64}")


@settings(max_examples=400)
@given(st.one_of(
    st.text(),
    st.text(alphabet="sha256:0123456789abcdefABCDEF\n /.", min_size=60, max_size=80),
    st.from_regex(r"sha256:[0-9a-fA-F]{63,65}\n?", fullmatch=True),
    st.integers(), st.none(), st.binary(),
))
def test_is_digest_says_what_the_exact_pattern_says(value):
    expected = isinstance(value, str) and EXACT.fullmatch(value) is not None
    assert is_digest(value) == expected


@pytest.mark.parametrize("bad", ["sha256:" + "A" * 64, "sha256:" + "a" * 64 + "\n", "sha512:" + "a" * 64,
                                 "sha256:" + "a" * 63, "sha256:../../etc/shadow" + "a" * 48, " sha256:" + "a" * 63])
def test_check_digest_refuses_near_misses(bad):
    with pytest.raises(InvalidDigest):
        check_digest(bad, "layer")
    assert check_digest("sha256:" + "0" * 64) == "sha256:" + "0" * 64
