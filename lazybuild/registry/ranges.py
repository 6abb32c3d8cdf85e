"""Byte ranges of a blob, whatever the registry does with a Range request.

The mounter and the snapshotter read a layer a chunk at a time: the footer and TOC at open
(read_tail, read_ranges), each missed window of chunks (read_ranges), the prefetch span (stream_range).
Ranges are asked for in one request where the registry allows (multipart/byteranges answers are
parsed), up to MAX_RANGES_PER_REQUEST ranges within MAX_SPAN_BYTES: an answer is read into memory
before its chunks are verified, so what one request may bring is bounded. A registry that refuses a
multi-range request (400, 416, 501) or answers it with the whole blob is remembered (the session's
`multirange_refused`): from then on its ranges are asked for one per request, up to
SINGLE_RANGE_WORKERS at a time, so a window of a dozen ranges still costs about one round trip. A
body cut off mid-way is asked for again at once (a new connection), then after a short backoff. A registry that answers a single range with 200 and the whole blob would otherwise
make every chunk cost the whole blob: the first such answer is read only as far as the ranges need;
from then on this client asks that registry for no more ranges: each blob is downloaded once,
verified against its digest, and its ranges are read from that temporary file. A range cannot be
checked against the blob digest: callers verify content (chunk digests).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterator

import httpx

from .blobs import blob_url, content_range_start, fetch_blob
from .bodies import printable
from .errors import RegistryError, read_body, status_error
from .session import MAX_ATTEMPTS, Session

# A 206 answer carries the span asked for, plus part headers when it is multipart/byteranges.
MULTIPART_SLACK_BYTES = 4096
PART_HEADER_BYTES = 1024
# Ranges per request: a Range header past about 8 KB is refused by common front ends (nginx's
# default header buffer), and 64 ranges is about 1.5 KB.
MAX_RANGES_PER_REQUEST = 64
# A request's answer is read into memory before its chunks are verified, and its cap is the span from
# its first byte to its last (a server may coalesce the ranges into one part): ranges further apart
# than this go in separate requests, in parallel.
MAX_SPAN_BYTES = 4 << 20
# Single-range requests in flight at once for a registry that refuses multi-range requests.
SINGLE_RANGE_WORKERS = 8
# Answers to a multi-range request that mean "ask for one range at a time".
MULTIRANGE_REFUSALS = (400, 416, 501)


class _KeptBlob:
    """A whole blob, downloaded once and verified, in an unnamed temporary file (gone with the process):
    the later ranges of a registry that ignores Range are read from here."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.f.fileno(), max(0, min(end, self.size) - start), start)  # thread-safe, no seek


class RangeReader:
    """The ranged reads of one registry session, and the whole blobs kept for a registry that ignores Range."""

    def __init__(self, session: Session):
        self.session = session
        self._kept: dict[str, _KeptBlob] = {}
        self._kept_locks: dict[str, threading.Lock] = {}
        self._kept_guard = threading.Lock()
        # Made when first needed: one for the requests of a read whose ranges are far apart, one for the
        # single ranges of a registry that refuses multi-range requests (a request of the first kind may
        # wait on the second, never the other way round, so neither can starve the other).
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def _pool(self, name: str) -> ThreadPoolExecutor:
        with self._kept_guard:
            if name not in self._pools:
                self._pools[name] = ThreadPoolExecutor(SINGLE_RANGE_WORKERS, thread_name_prefix=f"lazybuild-{name}")
            return self._pools[name]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        with self._kept_guard:
            for kept in self._kept.values():
                kept.f.close()
            self._kept.clear()

    def _kept_lock(self, digest: str) -> threading.Lock:
        with self._kept_guard:
            return self._kept_locks.setdefault(digest, threading.Lock())

    def _kept_blob(self, repository: str, digest: str) -> _KeptBlob | None:
        """The whole verified blob when this registry ignores Range (downloaded now if need be), else None."""
        kept = self._kept.get(digest)
        if kept is not None or not self.session.ranges_ignored:
            return kept
        with self._kept_lock(digest):  # concurrent readers of one blob download it once
            kept = self._kept.get(digest)
            if kept is None:
                f = tempfile.TemporaryFile(prefix="lazybuild-blob-")
                try:
                    size = fetch_blob(self.session, repository, digest, f)
                    f.flush()  # read() goes to the file descriptor (pread), past Python's buffer
                except BaseException:
                    f.close()
                    raise
                kept = self._kept[digest] = _KeptBlob(f, size)
        return kept

    def _keep_answer(self, r: httpx.Response, repository: str, digest: str, what: str) -> _KeptBlob:
        """Keep the whole blob a 200 answer is bringing anyway (verified), rather than asking again."""
        with self._kept_lock(digest):
            kept = self._kept.get(digest)
            if kept is not None:
                r.close()
                return kept
            f = tempfile.TemporaryFile(prefix="lazybuild-blob-")
            h, got = hashlib.sha256(), 0
            try:
                for data in r.iter_raw():
                    f.write(data)
                    h.update(data)
                    got += len(data)
            except httpx.TransportError:
                f.close()
                f = None
            finally:
                r.close()
            if f is not None:
                if "sha256:" + h.hexdigest() != digest:
                    f.close()
                    raise RegistryError(f"{what}: {r.request.url} sent {got} bytes whose digest is "
                                        f"sha256:{h.hexdigest()}, not {digest} (corrupt transfer or wrong blob)",
                                        200, str(r.request.url))
                f.flush()
                kept = self._kept[digest] = _KeptBlob(f, got)
                return kept
        kept = self._kept_blob(repository, digest)  # the connection dropped: download it, with resumes
        assert kept is not None
        return kept

    def stream_range(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes [start, end) of a blob as they arrive (one request; a 200 answer is read only up
        to `end`). The caller verifies content: a range cannot be checked against the blob digest."""
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            pos = start
            while pos < end:
                data = kept.read(pos, min(end, pos + (1 << 20)))
                if not data:
                    return
                pos += len(data)
                yield data
            return
        url = blob_url(self.session, repository, digest)
        what = f"range of blob {digest}"
        r = self.session.send("GET", url, scope=f"repository:{repository}:pull", what=what,
                              headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        try:
            if r.status_code not in (200, 206):
                raise status_error(r, what)
            if r.status_code == 200:
                self.session.note_ranges_ignored()
            elif content_range_start(r.headers.get("Content-Range", ""), url) != start:
                raise RegistryError(f"{what}: {url} answered bytes {printable(r.headers.get('Content-Range', ''))!r} "
                                    f"when asked for {start}-{end - 1}", 206, url)
            skip = start if r.status_code == 200 else 0
            left = end - start
            for data in r.iter_raw():
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                if not data:
                    continue
                data = data[:left]
                left -= len(data)
                yield data
                if left <= 0:
                    return
        finally:
            r.close()

    def read_ranges(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each [start, end) range of a blob, in one request where the registry allows.

        Multi-range answers (multipart/byteranges) are parsed; a registry that refuses them is asked for
        each range on its own, in parallel; a 200 (Range ignored) is read only up to the last byte
        needed. The caller verifies content (chunk digests): a range cannot be checked against the blob
        digest.
        """
        if not ranges:
            return []
        if any(a < 0 or b <= a for a, b in ranges):
            raise ValueError(f"ranges {ranges[:4]!r} of blob {digest}: each must be [start, end) with start < end")
        groups: list[list[int]] = []  # indexes into ranges, in blob order
        for i in sorted(range(len(ranges)), key=lambda i: ranges[i]):
            if groups and len(groups[-1]) < MAX_RANGES_PER_REQUEST and \
                    ranges[i][1] - ranges[groups[-1][0]][0] <= MAX_SPAN_BYTES:
                groups[-1].append(i)
            else:
                groups.append([i])

        def read(group: list[int]) -> list[bytes]:
            return self._read_group(repository, digest, [ranges[i] for i in group])

        answers = [read(groups[0])] if len(groups) == 1 else list(self._pool("requests").map(read, groups))
        out: list[bytes] = [b""] * len(ranges)
        for group, parts in zip(groups, answers):
            for i, data in zip(group, parts):
                out[i] = data
        return out

    def _read_group(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            return _from_kept(kept, digest, ranges)
        if len(ranges) > 1 and not self.session.multirange_refused:
            got = self._ask(repository, digest, ranges)
            if got is not None:
                return got
        if len(ranges) == 1:
            return [self._read_one(repository, digest, ranges[0])]
        return list(self._pool("ranges").map(lambda rg: self._read_one(repository, digest, rg), ranges))

    def _read_one(self, repository: str, digest: str, rg: tuple[int, int]) -> bytes:
        kept = self._kept_blob(repository, digest)  # another range of this blob may have found Range ignored
        if kept is not None:
            return _from_kept(kept, digest, [rg])[0]
        got = self._ask(repository, digest, [rg])
        assert got is not None  # only a multi-range request can be refused
        return got[0]

    def _ask(self, repository: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """One Range request for `ranges` (asked again when its body is cut off); None when the registry
        refuses a multi-range request (it is remembered)."""
        url = blob_url(self.session, repository, digest)
        what = f"ranges of blob {digest}"
        spec = ",".join(f"{a}-{b - 1}" for a, b in ranges)
        for attempt in range(MAX_ATTEMPTS):
            r = self.session.send("GET", url, scope=f"repository:{repository}:pull", what=what,
                                  headers={"Range": f"bytes={spec}", "Accept-Encoding": "identity"})
            try:
                if len(ranges) > 1 and (r.status_code in MULTIRANGE_REFUSALS or r.status_code == 200):
                    # A 200 here may be a server that serves single ranges only (as object stores do):
                    # the whole blob is not read; single ranges tell whether Range works at all.
                    self.session.note_multirange_refused(r.status_code)
                    return None
                if r.status_code == 200:
                    self.session.note_ranges_ignored()
                    return _slice_stream(r, ranges, what)
                if r.status_code != 206:
                    raise status_error(r, what)
                span = max(b for _, b in ranges) - min(a for a, _ in ranges)
                body = read_body(r, span + PART_HEADER_BYTES * len(ranges) + MULTIPART_SLACK_BYTES, what,
                                 "range answers")
                break
            except httpx.TransportError as e:  # the connection dropped mid-body: ask again
                if attempt + 1 == MAX_ATTEMPTS:
                    raise RegistryError(f"{what}: {url} kept dropping the connection ({e}); check the registry "
                                        "and the network, or try again later", None, url) from None
                self.session.pause(attempt)
            finally:
                r.close()
        ctype = r.headers.get("Content-Type", "")
        if ctype.startswith("multipart/byteranges"):
            parts = _parse_byteranges(body, ctype)
        else:
            parts = [(content_range_start(r.headers.get("Content-Range", ""), url), body)]
        out = []
        for a, b in ranges:
            for start, data in parts:
                if start <= a and b <= start + len(data):
                    out.append(data[a - start : b - start])
                    break
            else:
                raise RegistryError(f"{what}: {url} did not return bytes {a}-{b - 1}", 206, url)
        return out

    def read_tail(self, repository: str, digest: str, length: int) -> tuple[int, bytes]:
        """(blob size, its last `length` bytes) in one request (a suffix Range), instead of HEAD + GET:
        a round trip less per layer where the link is slow."""
        kept = self._kept_blob(repository, digest)
        if kept is not None:
            return kept.size, kept.read(max(0, kept.size - length), kept.size)
        url = blob_url(self.session, repository, digest)
        what = f"tail of blob {digest}"
        r = self.session.send("GET", url, scope=f"repository:{repository}:pull", what=what,
                              headers={"Range": f"bytes=-{length}", "Accept-Encoding": "identity"})
        if r.status_code == 206:
            body = read_body(r, length, what, "range answers")
            m = re.match(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("Content-Range", ""))
            if m and int(m.group(2)) + 1 == int(m.group(3)) and len(body) == int(m.group(2)) - int(m.group(1)) + 1:
                return int(m.group(3)), body
            raise RegistryError(f"{what}: {url} answered a suffix range with Content-Range "
                                f"{printable(r.headers.get('Content-Range', ''))!r}", 206, url)
        if r.status_code == 200:  # Range ignored: the whole blob is coming, and the tail is at its end
            self.session.note_ranges_ignored()
            kept = self._keep_answer(r, repository, digest, what)
            return kept.size, kept.read(max(0, kept.size - length), kept.size)
        raise status_error(r, what)


def _from_kept(kept: _KeptBlob, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    out = [kept.read(a, b) for a, b in ranges]
    if any(len(p) != b - a for p, (a, b) in zip(out, ranges)):
        raise RegistryError(f"ranges of blob {digest}: the blob is {kept.size} bytes, shorter than the "
                            f"ranges asked for (up to byte {max(b for _, b in ranges)})")
    return out


def _slice_stream(r: httpx.Response, ranges: list[tuple[int, int]], what: str) -> list[bytes]:
    """The ranges out of a whole-blob (200) body, reading it only up to the last byte needed and
    keeping only the bytes inside the ranges."""
    need = max(b for _, b in ranges)
    parts = [bytearray() for _ in ranges]
    pos = 0
    try:
        for data in r.iter_raw():
            end = pos + len(data)
            for part, (a, b) in zip(parts, ranges):
                if a < end and b > pos:
                    part += data[max(a - pos, 0) : min(b, end) - pos]
            pos = end
            if pos >= need:
                break
    finally:
        r.close()  # the rest of the blob is not read: the connection is dropped instead
    if pos < need:
        raise RegistryError(f"{what}: {r.request.url} answered the whole blob (HTTP 200), {pos} bytes, shorter "
                            f"than the ranges asked for (up to byte {need})", 200, str(r.request.url))
    return [bytes(p) for p in parts]


def _parse_byteranges(body: bytes, content_type: str) -> list[tuple[int, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise RegistryError(f"multipart/byteranges answer without a boundary ({content_type!r})")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        start = None
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                start = content_range_start(value.strip().decode(), "")
        if start is None:
            raise RegistryError("multipart/byteranges part without Content-Range")
        parts.append((start, data[:-2] if data.endswith(b"\r\n") else data))
    return parts
