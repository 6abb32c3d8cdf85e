"""What a registry's failure becomes: a `RegistryError` naming the URL, the status and what to try.

Every part of the client raises these. An error answer's body is read only within the error-body cap
(`bodies.py`) and only for the message it carries, which is made printable before anyone sees it.
"""

from __future__ import annotations

import json

import httpx

from ..errors import RemoteError
from ..image import size_text
from .bodies import MAX_ERROR_BODY_BYTES, BodyError, printable, read_capped


class RegistryError(RemoteError):
    def __init__(self, message: str, status: int | None = None, url: str = ""):
        super().__init__(message)
        self.status, self.url = status, url


def _hint(status: int) -> str:
    return {
        401: "check the credentials (`docker login`)",
        403: "the credentials lack permission for this repository",
        404: "check the repository, tag or digest",
        429: "the registry is rate-limiting; try again later",
    }.get(status, "the registry failed; try again later" if status >= 500 else "")


def status_error(r: httpx.Response, what: str) -> RegistryError:
    """The error for an unexpected status; reads (and closes) at most the error-body cap of R."""
    detail = ""
    try:
        errors = json.loads(read_capped(r, MAX_ERROR_BODY_BYTES, what, "error bodies")).get("errors") or []
        if errors:
            detail = ": " + printable("; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors), 300)
    except BodyError:
        detail = f" (its body was over the {size_text(MAX_ERROR_BODY_BYTES)} cap for error bodies and was not read)"
    except (ValueError, AttributeError, TypeError, RecursionError, httpx.HTTPError, httpx.StreamError):
        pass  # no usable detail: the status says enough
    finally:
        r.close()
    hint = _hint(r.status_code)
    return RegistryError(f"{what}: {r.request.method} {r.request.url} answered HTTP {r.status_code}{detail}"
                         + (f"; {hint}" if hint else ""), r.status_code, str(r.request.url))


def read_body(r: httpx.Response, cap: int, what: str, kind: str) -> bytes:
    """`read_capped`, with a body over its cap reported as the registry's error (status and URL)."""
    try:
        return read_capped(r, cap, what, kind)
    except BodyError as e:
        raise RegistryError(str(e), r.status_code, str(r.request.url)) from None
