"""Reading what a registry (or its token service) answers without trusting how much it sends.

A registry we did not choose can answer a manifest, a token or an error with gigabytes, or with a
small gzip body that inflates to gigabytes. Every body that is read into memory goes through
`read_capped`: it stops at the cap (before inflating past it) and says which cap was hit. Text
that came from the other side (error messages, realms) goes through `printable` before it reaches
a terminal, so it cannot carry escape sequences.
"""

from __future__ import annotations

import zlib

import httpx

from ..errors import RemoteError
from ..image import size_text

# A token answer is a JSON object with a JWT or an opaque token: a few KiB even with many scopes.
MAX_TOKEN_BYTES = 1 << 20
# An error body is read only for the message it carries.
MAX_ERROR_BODY_BYTES = 64 << 10


class BodyError(RemoteError, ValueError):
    """A body we refuse to read (over its cap, or in an encoding we did not ask for)."""


def read_capped(r: httpx.Response, cap: int, what: str, kind: str) -> bytes:
    """The body of R (closed afterwards), or BodyError naming WHAT, the URL and the cap for KIND."""
    url = r.request.url
    try:
        declared = r.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise BodyError(f"{what}: {url} announced {declared} bytes, over the {size_text(cap)} cap for {kind}; "
                            "a registry does not send that much here (a broken or hostile server)")
        encoding = r.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            inflate = None
        elif encoding in ("gzip", "x-gzip"):
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflate = zlib.decompressobj()
        else:  # we always ask for identity; br/zstd would need their own bounded decoders
            raise BodyError(f"{what}: {url} answered with Content-Encoding {printable(encoding)!r}, "
                            "which lazybuild did not ask for and does not read")
        buf = bytearray()
        for raw in r.iter_raw():
            # Inflate at most one byte past the cap: a small bomb never grows past it in memory.
            data = raw if inflate is None else inflate.decompress(raw, cap + 1 - len(buf))
            buf += data
            if len(buf) > cap:
                raise BodyError(f"{what}: {url} sent more than the {size_text(cap)} cap for {kind}; "
                                "a registry does not send that much here (a broken or hostile server)")
        return bytes(buf)
    except zlib.error as e:
        raise BodyError(f"{what}: {url} sent a {encoding} body that does not decode ({e})") from None
    finally:
        r.close()


def discard(r: httpx.Response) -> None:
    """Drop a body we do not need (a 401's, a redirect's) without reading more than the error cap of it."""
    try:
        declared = r.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) <= MAX_ERROR_BODY_BYTES:
            got = 0
            for raw in r.iter_raw():  # small: read it, so the connection can be reused
                got += len(raw)
                if got > MAX_ERROR_BODY_BYTES:
                    break
    except httpx.HTTPError:
        pass
    finally:
        r.close()  # anything left unread is dropped with the connection


def printable(text: str, limit: int = 200) -> str:
    """TEXT from the other side, safe to print: control characters replaced, at most LIMIT characters."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")
