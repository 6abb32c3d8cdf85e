"""The eStargz table of contents: entries, names, and the exact JSON bytes stargz-snapshotter writes.

The TOC digest (annotation `containerd.io/snapshot/stargz/toc.digest`) is the sha256 of the raw JSON
bytes, so the serialization here follows Go's `json.MarshalIndent(toc, "", "\\t")` of
`estargz/types.go`: field order, omitempty rules, base64 xattr values, HTML escaping
(reference/estargz.md §1.3).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import math
import posixpath
import re
import types
from dataclasses import dataclass, field

from ..digest import InvalidDigest, check_digest, is_digest
from .errors import FormatError, LimitExceeded, UnsafeEntryError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

# Layer-descriptor annotations the snapshotter and Stargz Store read.
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
# stargz-snapshotter's zstd variant still writes containers/storage's *old* key names.
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"

MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

NO_XATTRS = types.MappingProxyType({})  # shared by the many entries without xattrs

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")


@dataclass(slots=True)
class TOCEntry:
    """One TOC entry. Field order is Go's serialization order; `name` and `type` are always written."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""  # RFC3339, seconds, UTC; "" for the epoch
    link_name: str = ""
    mode: int = 0  # the tar header's mode field
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0  # compressed offset of the member/frame holding this payload
    inner_offset: int = 0  # v0.13+: uncompressed offset inside a shared member
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""  # sha256 of the whole file (reg only)
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""

    # Filled in by the reader (never serialized): normalized path, end of the compressed range.
    path: str = field(default="", compare=False, repr=False)
    compressed_end: int = field(default=0, compare=False, repr=False)

    def is_payload(self) -> bool:
        """True for entries whose bytes live in a member of their own (non-empty reg, chunk)."""
        return (self.type == "reg" and self.size > 0) or self.type == "chunk"

    def to_go_dict(self) -> dict:
        """The entry as Go's encoding/json writes it (omitempty on everything but name and type)."""
        d: dict = {"name": self.name, "type": self.type}
        for key, value in (
            ("size", self.size),
            ("modtime", self.modtime),
            ("linkName", self.link_name),
            ("mode", self.mode),
            ("uid", self.uid),
            ("gid", self.gid),
            ("userName", self.user_name),
            ("groupName", self.group_name),
            ("offset", self.offset),
            ("innerOffset", self.inner_offset),
            ("devMajor", self.dev_major),
            ("devMinor", self.dev_minor),
        ):
            if value:
                d[key] = value
        if self.xattrs:
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        for key, value in (
            ("digest", self.digest),
            ("chunkOffset", self.chunk_offset),
            ("chunkSize", self.chunk_size),
            ("chunkDigest", self.chunk_digest),
        ):
            if value:
                d[key] = value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TOCEntry":
        """One entry of a TOC a stranger wrote: every field is type- and range-checked here, once, so
        nothing later (cache paths, reads, allocations, mknod) sees a digest that is not a digest or
        a negative or absurd number."""
        # Hot at every mount (one call per entry): plain lookups, positional arguments in field order.
        if not isinstance(d, dict):
            raise FormatError(f"TOC entry without a name or type: {d!r:.200}")
        name, typ = d.get("name"), d.get("type")
        if not isinstance(name, str) or not isinstance(typ, str):
            raise FormatError(f"TOC entry without a name or type: {d!r:.200}")
        xattrs = {}
        raw_xattrs = d.get("xattrs")
        if raw_xattrs:
            if not isinstance(raw_xattrs, dict):
                raise FormatError(f"TOC entry {name!r}: xattrs is not an object")
            for k, v in raw_xattrs.items():
                if not k or "\0" in k:
                    raise FormatError(f"TOC entry {name!r}: xattr name {k!r} is empty or has a NUL byte")
                try:
                    xattrs[k] = base64.b64decode(v, validate=True)
                except (ValueError, TypeError) as e:
                    raise FormatError(f"TOC entry {name!r}: xattr {k!r} is not base64") from e
        get = d.get
        try:
            e = cls(name, typ, int(get("size", 0)), get("modtime") or "", get("linkName") or "",
                    int(get("mode", 0)), int(get("uid", 0)), int(get("gid", 0)), get("userName") or "",
                    get("groupName") or "", int(get("offset", 0)), int(get("innerOffset", 0)),
                    int(get("devMajor", 0)), int(get("devMinor", 0)), xattrs, get("digest") or "",
                    int(get("chunkOffset", 0)), int(get("chunkSize", 0)), get("chunkDigest") or "")
        except (TypeError, ValueError, AttributeError, OverflowError) as err:
            raise FormatError(f"TOC entry {name!r}: bad field: {err}") from err
        # One OR per group: a negative value makes the OR negative, and so does nothing else.
        if (e.size | e.offset | e.inner_offset | e.chunk_offset | e.chunk_size) >> 62:
            raise FormatError(f"TOC entry {name!r}: a size or offset is negative or past 2^62 "
                              f"(size {e.size}, offset {e.offset}, innerOffset {e.inner_offset}, "
                              f"chunkOffset {e.chunk_offset}, chunkSize {e.chunk_size})")
        if (e.mode | e.uid | e.gid | e.dev_major | e.dev_minor) >> 32:
            raise FormatError(f"TOC entry {name!r}: mode, uid, gid or device number is negative or past 32 bits")
        if (type(e.modtime) is not str or type(e.link_name) is not str or type(e.user_name) is not str
                or type(e.group_name) is not str):
            raise FormatError(f"TOC entry {name!r}: modtime, linkName, userName or groupName is not a string")
        # Digests name files of the chunk cache: only the exact `sha256:` + 64 hex form may pass. (An
        # unchunked file's chunkDigest is its digest: one check does for both.)
        dg, cdg = e.digest, e.chunk_digest
        if (dg and not is_digest(dg)) or (cdg and cdg != dg and not is_digest(cdg)):
            try:
                check_digest(dg or "sha256:" + "0" * 64, f"TOC entry {name!r}: digest")
                check_digest(cdg or "sha256:" + "0" * 64, f"TOC entry {name!r}: chunkDigest")
            except InvalidDigest as err:
                raise FormatError(str(err)) from None
        return e


def clean_name(name: str) -> str:
    """Go's `strings.TrimPrefix(path.Clean("/"+name), "/")`: the key every reader and the sorter use."""
    return posixpath.normpath("/" + name).lstrip("/")


def safe_name(name: str, what: str = "entry") -> str:
    """clean_name, but a name whose `..` climbs above the layer root is refused rather than folded.

    Go folds `../x` into `x`; a layer that says `../x` was made to escape, so we name it instead.
    A leading `/` is kept relative to the root, as GNU tar and the reference do.
    """
    stem = name[2:] if name.startswith("./") else name  # tar's "./usr/bin/" form
    stem = stem[:-1] if stem.endswith("/") else stem
    if stem and stem[0] not in "./" and "//" not in stem and "/." not in stem and not stem.endswith("/"):
        return stem  # already what clean_name gives (the usual case): no "", ".", ".." parts, no leading "/"
    depth = 0
    for part in name.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeEntryError(f"{what} {name!r} escapes the layer root")
        elif part not in ("", "."):
            depth += 1
    return clean_name(name)


@functools.lru_cache(maxsize=1 << 16)  # files of one package share mtimes: share the strings too
def format_modtime(mtime: float) -> str:
    """Go: `t.UTC().Round(time.Second).Format(time.RFC3339)`, empty when Unix() == 0."""
    if 0 <= mtime < 1 or not math.isfinite(mtime):
        return ""
    seconds = math.floor(mtime + 0.5)  # Go rounds half up
    try:
        t = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return ""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def parse_modtime(text: str) -> float:
    """Seconds since the epoch of a TOC modtime; 0 when absent."""
    if not text:
        return 0.0
    if not isinstance(text, str) or not _RFC3339.match(text):
        raise FormatError(f"TOC modtime {text!r:.100} is not RFC 3339")
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as e:  # month 13, year 0, ...
        raise FormatError(f"TOC modtime {text!r} is not a date: {e}") from None


# Go's encoder escapes these inside strings; Python's does not (reference/estargz.md §1.3).
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_encode_str = json.encoder.encode_basestring  # the C encoder, ensure_ascii=False, as Go (raw UTF-8)


def _go_string(value: str) -> str:
    # Names that were not UTF-8 in the tar arrive as surrogate escapes; Go writes U+FFFD for them.
    return _SURROGATE_RE.sub("\ufffd", value)


def _sanitize(obj):
    if isinstance(obj, str):
        return _go_string(obj)
    if isinstance(obj, dict):
        return {_go_string(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_sanitize(v) for v in obj]
    return obj


def go_json_indent(obj) -> bytes:
    """`json.MarshalIndent(obj, "", "\\t")` as Go writes it, for dicts/lists/str/int."""
    text = json.dumps(_sanitize(obj), ensure_ascii=False, indent="\t", separators=(",", ": "))
    # <, >, & and U+2028/9 can only occur inside strings in JSON text, so a plain substitution is exact.
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text).encode("utf-8")


def _go_value(value, indent: str) -> str:
    if isinstance(value, str):
        return _encode_str(value if value.isascii() else _go_string(value))
    if isinstance(value, dict):  # xattrs, the only nested object
        inner = indent + "\t"
        items = ",\n".join(f"{inner}{_encode_str(_go_string(k))}: {_go_value(v, inner)}" for k, v in value.items())
        return "{\n" + items + "\n" + indent + "}"
    return str(value)


def toc_json_parts(entries) -> list[bytes]:
    """The raw TOC JSON, in pieces that join to exactly go_json_indent() of the TOC. Written directly
    (Python's json falls back to its slow pure-Python encoder when indenting) and in pieces, so a TOC of
    100,000 entries is never copied whole; `entries` may be a consuming iterator."""
    parts = [b'{\n\t"version": 1,\n\t"entries": [\n']
    for e in entries:
        fields = ",\n".join(f'\t\t\t"{k}": {_go_value(v, chr(9) * 3)}' for k, v in e.to_go_dict().items())
        text = "\t\t{\n" + fields + "\n\t\t},\n"
        if _GO_ESCAPE_RE.search(text):
            text = _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text)
        parts.append(text.encode("utf-8"))
    if len(parts) == 1:
        return [go_json_indent({"version": 1, "entries": []})]
    parts[-1] = parts[-1][:-2] + b"\n\t]\n}"  # the last entry takes no comma
    return parts


def toc_json(entries: list[TOCEntry]) -> bytes:
    """The raw TOC JSON whose sha256 is the TOC digest."""
    return b"".join(toc_json_parts(entries))


# Entries per TOC. Each costs ~1 KB of Python objects once parsed and indexed, and 150 MiB of minimal
# JSON entries would be ~6 million of them (GBs): the count is capped before json.loads builds them.
# A million is past any real layer (the largest seen hold a few hundred thousand files).
MAX_TOC_ENTRIES = 1 << 20


def parse_toc_json(raw: bytes) -> list[TOCEntry]:
    """The entries of a raw TOC (its size is capped by the reader before it gets here)."""
    # Every entry is a JSON object and no object can be written without a "{" (escapes exist only
    # inside strings), so this count is an upper bound on the entries; it costs ~1 ms per 10 MB.
    objects = raw.count(b"{")
    if objects > MAX_TOC_ENTRIES + 1:
        raise LimitExceeded(f"TOC holds up to {objects} entries, more than the {MAX_TOC_ENTRIES} cap on TOC entries "
                            "(estargz.toc.MAX_TOC_ENTRIES); split the layer if it really has that many files")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"TOC is not valid JSON: {e}") from e
    except RecursionError:  # `[[[[...` a few thousand deep: json's C parser gives up on the Python stack
        raise FormatError("TOC JSON is nested too deeply to be a TOC") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries", []), list):
        raise FormatError("TOC JSON has no entries list")
    if doc.get("version", 1) != 1:
        raise FormatError(f"TOC version {doc.get('version')!r} is not supported (want 1)")
    return [TOCEntry.from_json(d) for d in doc.get("entries") or []]
