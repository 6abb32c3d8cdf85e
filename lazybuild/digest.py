"""Content digests as they enter from outside: one exact form, checked before a digest names anything.

A digest from a manifest, an OCI layout, a TOC entry or a snapshotter label later becomes a file name
(the chunk cache, kept TOCs, blob stores) or a cache key. Anything but `sha256:` and 64 lowercase hex
digits could name another path (`sha256:../../etc/shadow`), so it is refused where it enters, not
where it is used; the stores check again as a second line.
"""

from __future__ import annotations

import hashlib
import re

from .errors import InputError

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class InvalidDigest(InputError):
    """A digest that is not `sha256:` + 64 lowercase hex digits."""


def is_digest(value: object) -> bool:
    # Called once per TOC entry at every mount (tens of thousands): a length check and a strip of the
    # hex alphabet is ~5x cheaper than the regex and says the same (_SHA256 stays the definition).
    return (type(value) is str and len(value) == 71 and value.startswith("sha256:")
            and not value[7:].strip("0123456789abcdef"))


def check_digest(value: object, what: str = "digest") -> str:
    """VALUE if it is an exact sha256 digest, else InvalidDigest naming WHAT it was meant to be."""
    if not is_digest(value):
        shown = value if isinstance(value, str) and len(value) <= 100 else repr(value)[:100]
        raise InvalidDigest(f"{what}: {shown!r} is not a sha256 digest (sha256: and 64 lowercase hex digits)")
    return value  # type: ignore[return-value]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of a checked digest: the only part that may become a file name."""
    return check_digest(digest)[len("sha256:"):]
