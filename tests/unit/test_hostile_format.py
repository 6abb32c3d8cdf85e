"""Hostile layers against the layer format (issue 14): evil TOCs, footers, chunks and tars, made by hand.

Each attack asserts a clear error (naming the layer, the entry and what is wrong) and that the work
done before the error was bounded: a tracemalloc peak under a small bound and a wall-clock alarm. The
extraction attacks aim at the host canary tree and the fixture checks it came out untouched. The
property tests feed the tar reader, the TOC parser and the footer parser mutated real blobs and tars.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import struct
import tarfile
import tempfile
import tracemalloc

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from lazybuild.estargz import (
    ChunkDigestMismatch,
    EStargzError,
    FooterError,
    FormatError,
    LayerReader,
    LimitExceeded,
    UnsafeEntryError,
    build,
    extract,
)
from lazybuild.estargz import compression as c
from lazybuild.estargz import reader as reader_module
from lazybuild.estargz.compression import Gzip, Zstd
from lazybuild.estargz.tarinput import read_members
from lazybuild.estargz.toc import parse_toc_json

MiB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BytesBlob:
    """A blob in memory, with FileBlob's short-read error."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read_at(self, offset: int, length: int) -> bytes:
        out = self.data[offset:offset + length]
        if offset < 0 or len(out) != length:
            raise FormatError(f"wanted {length} bytes at {offset}, the blob has {self.size}")
        return out


class _Sink(io.BytesIO):
    def add_raw(self, raw: bytes) -> None:
        pass


def layer(entries: list[dict], head: bytes = b"", kind: str = "gzip") -> bytes:
    """A blob: HEAD (payload members), then the TOC and footer as the writer makes them."""
    sink = _Sink()
    sink.write(head)
    (Zstd() if kind == "zstd" else Gzip()).write_trailer(sink, len(head), [json.dumps({"version": 1, "entries": entries}).encode()])
    return sink.getvalue()


def one_file(kind: str = "gzip", data: bytes = b"hello\n", member: bytes | None = None, **fields) -> bytes:
    """A layer with one regular file `f`, its bytes in the first member; FIELDS override its TOC entry."""
    member = member if member is not None else (Zstd() if kind == "zstd" else Gzip()).compress_member(data)
    entry = {"name": "f", "type": "reg", "size": len(data), "offset": 0, "digest": sha(data), "chunkDigest": sha(data)}
    entry.update(fields)
    return layer([entry], member, kind)


def bomb(kind: str, size: int) -> bytes:
    """One gzip member / zstd frame of SIZE zero bytes, compressed without ever holding them."""
    zero = bytes(MiB)
    if kind == "zstd":
        comp = zstandard.ZstdCompressor(level=1).compressobj()
        flush = comp.flush
    else:
        comp = zlib_ng.compressobj(9, zlib_ng.DEFLATED, 31)
        flush = comp.flush
    out = [comp.compress(zero) for _ in range(size // MiB)]
    return b"".join(out) + flush()


def open_blob(data: bytes, name: str = "evil-layer") -> LayerReader:
    return LayerReader(BytesBlob(data), name=name)


class Unbounded(Exception):
    """Not an EStargzError: a test that hits its time alarm fails instead of passing."""


@contextlib.contextmanager
def bounded(seconds: float = 15.0, peak: int = 8 * MiB):
    """The block must finish within SECONDS and allocate at most PEAK bytes (tracemalloc) at once."""
    def alarm(*_):
        raise Unbounded(f"did not finish within {seconds} s (a loop that does not advance?)")

    old = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert used < peak, f"allocated {used} bytes at once, more than the {peak} allowed"


# --- TOC digests that name paths (issue 14, "Host file deletion") -----------------------------------

EVIL_DIGESTS = ["sha256:/etc/shadow", "sha256:../../x", "sha256:" + "A" * 64, "sha256:" + "0" * 63,
                "sha512:" + "0" * 128, "sha256:" + "0" * 64 + "/../../x", "md5:d41d8cd98f00b204e9800998ecf8427e"]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize("field", ["digest", "chunkDigest"])
@pytest.mark.parametrize("value", EVIL_DIGESTS)
def test_toc_digest_that_is_not_a_digest_is_refused(kind, field, value):
    with bounded():
        with pytest.raises(FormatError) as err:
            open_blob(one_file(kind, **{field: value}))
    msg = str(err.value)
    assert "evil-layer" in msg and "'f'" in msg and field in msg and "not a sha256 digest" in msg


def test_toc_digest_aimed_at_the_canary_is_refused(canary):
    rel = canary.rel_from(os.getcwd())
    for value in (f"sha256:{rel}/root/victim", f"sha256:{canary.victim}"):
        with pytest.raises(FormatError, match="chunkDigest"):
            open_blob(one_file(chunkDigest=value))


def test_chunk_entry_digest_is_checked_too():
    data = b"a" * 100
    member = Gzip().compress_member(data)
    entries = [{"name": "f", "type": "reg", "size": 100, "offset": 0, "chunkSize": 50, "digest": sha(data),
                "chunkDigest": sha(data[:50])},
               {"name": "f", "type": "chunk", "offset": 0, "chunkOffset": 50, "chunkSize": 50,
                "chunkDigest": "sha256:../../../../etc/shadow"}]
    with pytest.raises(FormatError, match=r"chunkDigest: 'sha256:\.\./"):
        open_blob(layer(entries, member))


# --- numbers that would drive reads and allocations --------------------------------------------------

@pytest.mark.parametrize("fields,expect", [
    ({"size": -1}, "negative"),
    ({"offset": -10}, "negative"),
    ({"chunkSize": -5}, "negative"),
    ({"innerOffset": -1}, "negative"),
    ({"size": 1 << 70}, "negative or past 2"),
    ({"uid": -1}, "uid"),
    ({"mode": 1 << 40}, "mode"),
    ({"devMajor": -1}, "device"),
    ({"size": "lots"}, "bad field"),
    ({"size": 1e400}, "bad field"),
    ({"modtime": 5}, "not a string"),
    ({"offset": 1 << 40}, "outside the payload part of the blob"),
    ({"chunkSize": 3, "size": 6}, "chunks of 'f' cover 3 of 6"),
])
def test_nonsense_numbers_are_refused(fields, expect):
    with bounded():
        with pytest.raises(FormatError, match=expect) as err:
            open_blob(one_file(**fields))
    assert "evil-layer" in str(err.value)


def test_chunk_past_the_end_of_its_file_is_refused():
    data = b"b" * 100
    member = Gzip().compress_member(data)
    entries = [{"name": "f", "type": "reg", "size": 100, "offset": 0, "chunkSize": 50, "digest": sha(data),
                "chunkDigest": sha(data[:50])},
               {"name": "f", "type": "chunk", "offset": 0, "chunkOffset": 50, "chunkSize": 1 << 30,
                "chunkDigest": sha(data[50:])}]
    with pytest.raises(FormatError, match="do not tile the file: chunk at 50 .size 1073741824. after 50 of 100"):
        open_blob(layer(entries, member))


def test_chunk_past_the_chunk_cap_is_refused():
    # A file of 3 GiB in one chunk would be inflated whole into memory before its digest could fail.
    with pytest.raises(LimitExceeded, match=r"evil-layer: 'f' has a chunk of 3221225472 bytes.*1024 MiB cap"):
        open_blob(one_file(size=3 << 30))


def test_writer_refuses_a_chunk_size_readers_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="MiB a reader accepts"):
        build(str(tmp_path / "missing.tar"), io.BytesIO(), chunk_size=reader_module.MAX_CHUNK_SIZE + 1)


# --- chunks never inflate past their TOC size ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_chunk_bomb_inflates_only_its_toc_size(kind):
    evil = bomb(kind, 256 * MiB)  # a few hundred KB (gzip) or ~8 KB (zstd) that inflate to 256 MiB
    r = open_blob(one_file(kind, data=b"\0" * 8192, member=evil))
    with bounded(peak=1 * MiB):
        # The first 8192 bytes of the bomb *are* the file here: the digest matches, nothing more was made.
        assert r.read_file("f") == b"\0" * 8192
    r = open_blob(one_file(kind, data=b"x" * 8192, member=evil))
    with bounded(peak=1 * MiB):
        with pytest.raises(ChunkDigestMismatch, match="evil-layer: 'f' chunk at 0 does not match"):
            r.read_file("f")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_inner_offset_into_a_bomb_is_skipped_in_bounded_steps(kind):
    evil = bomb(kind, 64 * MiB)
    r = open_blob(one_file(kind, data=b"\0" * 100, member=evil, innerOffset=60 * MiB))
    with bounded(peak=3 * MiB):
        assert r.read_file("f") == b"\0" * 100


# --- TOC caps --------------------------------------------------------------------------------------------

def test_gzip_toc_whose_header_exceeds_the_cap_is_never_inflated():
    header = tarfile.TarInfo(c.TOC_TAR_NAME)
    header.size = 10 << 30
    gz = zlib_ng.compressobj(9, zlib_ng.DEFLATED, 31)
    member = gz.compress(header.tobuf(tarfile.GNU_FORMAT)) + gz.compress(bytes(4 * MiB)) + gz.flush()
    blob = member + c.gzip_footer(0)
    with bounded(peak=2 * MiB + len(blob)):
        with pytest.raises(LimitExceeded, match=r"evil-layer: TOC is 10240.0 MiB uncompressed, more than the 150.0 MiB cap"):
            open_blob(blob)


def test_gzip_toc_bomb_under_a_small_header_is_inflated_only_that_far():
    header = tarfile.TarInfo(c.TOC_TAR_NAME)
    header.size = 1000
    gz = zlib_ng.compressobj(9, zlib_ng.DEFLATED, 31)
    member = gz.compress(header.tobuf(tarfile.USTAR_FORMAT)) + b"".join(gz.compress(bytes(MiB)) for _ in range(200)) + gz.flush()
    blob = member + c.gzip_footer(0)
    with bounded(peak=1 * MiB + len(blob)):
        with pytest.raises(FormatError, match="evil-layer: TOC is not valid JSON"):
            open_blob(blob)


def test_zstd_toc_bomb_is_inflated_only_to_the_footer_size():
    evil = bomb("zstd", 256 * MiB)
    blob = b"\0" * 8 + evil + c.skippable_frame(c.zstd_footer(8, len(evil), 1000))
    with bounded(peak=1 * MiB):
        with pytest.raises(FormatError, match="evil-layer: zstd TOC is more than the 1000 bytes the footer says"):
            open_blob(blob)


def test_zstd_footer_past_the_raw_cap_is_refused_before_reading():
    blob = b"\0" * 100 + c.skippable_frame(c.zstd_footer(8, 50, 1 << 40))
    with pytest.raises(LimitExceeded, match=r"evil-layer: the zstd footer gives a TOC of 1048576.0 MiB uncompressed"):
        open_blob(blob)


def test_toc_caps_are_what_the_reader_uses(monkeypatch):
    good = one_file()
    open_blob(good)
    monkeypatch.setattr(c, "MAX_TOC_SIZE", 100)
    with pytest.raises(LimitExceeded, match=r"cap on a TOC \(estargz.compression.MAX_TOC_SIZE\)"):
        open_blob(good)
    monkeypatch.setattr(c, "MAX_TOC_SIZE", 150 * MiB)
    monkeypatch.setattr(c, "MAX_TOC_COMPRESSED_SIZE", 100)
    with pytest.raises(LimitExceeded, match=r"compressed TOC of \d+ bytes, more than the 100 bytes cap"):
        open_blob(good)


# --- footers pointing outside the blob ---------------------------------------------------------------------

def legacy_footer(toc_offset: int) -> bytes:
    payload = b"%016xSTARGZ" % toc_offset
    return b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", 22) + payload + b"\x01\x00\x00\xff\xff" + bytes(8)


def sparse_blob(path: str, size: int, footer: bytes) -> str:
    """SIZE bytes, all holes but the footer: a reader that reads 'the TOC' whole would need SIZE bytes."""
    with open(path, "wb") as f:
        f.truncate(size - len(footer))
        f.seek(size - len(footer))
        f.write(footer)
    return path


@pytest.mark.parametrize("footer,expect", [
    (c.gzip_footer(0), LimitExceeded),
    (legacy_footer(0), LimitExceeded),
    (c.gzip_footer((1 << 30) + 5), FormatError),
    (c.gzip_footer((1 << 64) - 1), FormatError),
    (legacy_footer(1 << 40), FormatError),
    (c.skippable_frame(c.zstd_footer(0, 100, 100)), FormatError),
    (c.skippable_frame(c.zstd_footer(8, (1 << 30), 100)), FormatError),
    (c.skippable_frame(c.zstd_footer(8, (1 << 30) - 100, 100)), LimitExceeded),
    (c.skippable_frame(c.zstd_footer((1 << 64) - 1, 10, 100)), FormatError),
    (c.skippable_frame(c.zstd_footer(8, 0, 0)), FormatError),
])
def test_footer_outside_the_blob_or_past_the_cap_reads_nothing(tmp_path, footer, expect):
    path = sparse_blob(str(tmp_path / "big.blob"), 1 << 30, footer)
    with bounded(peak=2 * MiB):  # the tail read is 256 KiB; the blob is 1 GiB
        with pytest.raises(expect) as err:
            LayerReader.open_file(path)
    msg = str(err.value)
    assert path in msg and ("outside the blob" in msg or "cap" in msg)
    if expect is LimitExceeded:
        assert "64.0 MiB cap" in msg


def test_footer_offset_with_a_sign_is_not_hex():
    blob = b"\0" * 100 + c.gzip_footer(0).replace(b"0000000000000000STARGZ", b"-000000000000001STARGZ")
    with pytest.raises(FooterError, match="not 16 hex digits"):
        open_blob(blob)


def test_a_small_layer_whose_toc_is_at_offset_0_still_opens():
    # Writers put an empty layer's TOC at offset 0: that is fine when the blob is under the TOC cap.
    r = open_blob(layer([{"name": "d/", "type": "dir"}]))
    assert r.toc_offset == 0 and r.lookup("d") is not None


# --- the tar reader ---------------------------------------------------------------------------------------

def tar_header(name: str = "f", size: int = 0, kind: bytes = tarfile.REGTYPE, size_field: bytes | None = None,
               checksum: bytes | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    if size_field is not None:
        block[124:136] = size_field
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % (sum(block))
    if checksum is not None:
        block[148:156] = checksum
    return bytes(block)


def members_of(data: bytes):
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return read_members(f.fileno())


def test_tar_negative_base256_size_is_refused_not_a_loop():
    evil = tar_header(size_field=b"\xff" * 12) + bytes(1024)  # -1 in GNU base-256
    with bounded():
        with pytest.raises(FormatError, match=r"header at offset 0 gives a negative size \(-1\)"):
            members_of(evil)
    far = tar_header(size_field=b"\xff" + (-(1 << 40)).to_bytes(11, "big", signed=True)[0:11]) + bytes(1024)
    with bounded():
        with pytest.raises(FormatError, match="negative size"):
            members_of(tar_header("ok", 0) + far)


def test_tar_size_past_the_input_is_refused():
    evil = tar_header(size=1 << 40) + b"x" * 512
    with bounded():
        with pytest.raises(FormatError, match=r"truncated in the payload of 'f': 1099511627776 bytes at offset 512"):
            members_of(evil)
    # ...for types that are not regular files too (they would skip past the end and look like EOF)
    evil = tar_header(kind=b"V", size=10 << 20) + bytes(1024)
    with pytest.raises(FormatError, match="truncated"):
        members_of(evil)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_tar_absurd_extended_header_length_is_refused_before_reading(kind):
    evil = tar_header("././@LongLink", size=1 << 40, kind=kind) + bytes(1024)
    with bounded(peak=1 * MiB):
        with pytest.raises(LimitExceeded, match=r"extended header .* is 1099511627776 bytes, past the 1 MiB cap"):
            members_of(evil)


@pytest.mark.parametrize("record,expect", [
    (b"0 path=x\n", "bad PAX record"),
    (b"3 path=x\n", "bad PAX record"),
    (b"99999 path=x\n", "bad PAX record"),
    (b"path=x\n", "bad PAX record"),
    (b"13 size=-100\n", "negative or absurd"),
    (b"11 uid=abc\n", "PAX uid=.abc."),
    (b"14 mtime=nan1\n", "mtime"),
    (b"13 mtime=inf\n", "mtime"),
    (b"12 path=a\0b\n", "NUL byte"),
])
def test_tar_bad_pax_records_are_refused(record, expect):
    pax = tar_header("././@PaxHeader", size=len(record), kind=tarfile.XHDTYPE) + record + c.tar_padding(len(record))
    with bounded():
        with pytest.raises(FormatError, match=expect):
            members_of(pax + tar_header("f", 0) + bytes(1024))


@pytest.mark.parametrize("checksum", [b"-0000001", b"+1234567", b"1_000000", b"99999999", b"\x80" + bytes(7)])
def test_tar_checksum_nonsense_is_refused(checksum):
    with pytest.raises(FormatError, match="input is not a tar archive"):
        members_of(tar_header(checksum=checksum) + bytes(1024))


# --- extraction stays inside its destination -----------------------------------------------------------

def hostile_layer(entries: list[dict], files: dict[str, bytes] | None = None) -> bytes:
    """A layer from entries (files get members and digests from FILES)."""
    head = b""
    gz = Gzip()
    out = []
    for e in entries:
        e = dict(e)
        if e["type"] == "reg" and e["name"] in (files or {}):
            data = files[e["name"]]
            e.update(size=len(data), offset=len(head), digest=sha(data), chunkDigest=sha(data))
            head += gz.compress_member(data)
        out.append(e)
    return layer(out, head)


def test_extract_absolute_names_are_rebased_inside(tmp_path, canary):
    dest = tmp_path / "dest"
    target = os.path.join(canary.writable_dir, "evil")
    r = open_blob(hostile_layer([{"name": target, "type": "reg"}], {target: b"* * * * * root pwn\n"}))
    extract(r, str(dest))
    assert (dest / target.lstrip("/")).read_bytes() == b"* * * * * root pwn\n"


@pytest.mark.parametrize("name", ["a/../../x", "../x", "./../../x", "a/b/../../../x", "..", "x/../.."])
def test_extract_dotdot_names_are_refused(tmp_path, canary, name):
    rel = os.path.join(canary.rel_from(str(tmp_path / "dest")), "etc", "cron.d", "evil")
    for evil in (name, name.replace("x", rel)):
        for kind in ("reg", "dir", "symlink"):
            with pytest.raises(UnsafeEntryError, match=r"evil-layer: entry .* escapes the layer root"):
                open_blob(hostile_layer([{"name": evil, "type": kind, "linkName": "y"}], {evil: b"pwn"}))


def test_extract_symlink_then_file_under_it_is_refused(tmp_path, canary):
    entries = [{"name": "a", "type": "symlink", "linkName": canary.writable_dir},
               {"name": "a/evil", "type": "reg"}]
    with pytest.raises(UnsafeEntryError, match=r"evil-layer: entries lie under the symlink 'a'"):
        open_blob(hostile_layer(entries, {"a/evil": b"pwn"}))
    rel = canary.rel_from(str(tmp_path / "dest"))
    entries = [{"name": "up", "type": "symlink", "linkName": rel}, {"name": "up/etc/cron.d/evil", "type": "reg"}]
    with pytest.raises(UnsafeEntryError, match="under the symlink 'up'"):
        open_blob(hostile_layer(entries, {"up/etc/cron.d/evil": b"pwn"}))


def test_extract_through_a_symlink_already_in_the_destination_replaces_it(tmp_path, canary):
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(canary.writable_dir, dest / "a")
    r = open_blob(hostile_layer([{"name": "a/evil", "type": "reg"}], {"a/evil": b"pwn"}))
    extract(r, str(dest))
    assert not os.path.islink(dest / "a") and (dest / "a" / "evil").read_bytes() == b"pwn"


@pytest.mark.parametrize("target", ["../../etc/shadow", "a/../../../etc/shadow"])
def test_extract_hardlink_out_of_the_layer_is_refused(canary, target):
    entries = [{"name": "hl", "type": "hardlink", "linkName": target}]
    with pytest.raises(UnsafeEntryError, match="evil-layer: hardlink 'hl' target"):
        open_blob(hostile_layer(entries))


def test_extract_hardlink_to_an_absolute_host_path_is_rebased_and_not_found(canary):
    entries = [{"name": "hl", "type": "hardlink", "linkName": canary.secret}]
    with pytest.raises(FormatError, match="evil-layer: hardlink 'hl' -> .*: no such file"):
        open_blob(hostile_layer(entries))


def test_extract_hardlink_to_a_symlink_links_the_symlink_not_its_target(tmp_path, canary):
    dest = tmp_path / "dest"
    entries = [{"name": "ln", "type": "symlink", "linkName": canary.secret},
               {"name": "hl", "type": "hardlink", "linkName": "ln"}]
    r = open_blob(hostile_layer(entries))
    extract(r, str(dest))
    st_ln, st_hl = os.lstat(dest / "ln"), os.lstat(dest / "hl")
    assert stat.S_ISLNK(st_hl.st_mode) and st_hl.st_ino == st_ln.st_ino and st_hl.st_nlink == 2
    assert os.readlink(dest / "hl") == canary.secret  # a link in the tree; never followed by extract


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of devices needs root")
def test_extract_device_entries_stay_inside(tmp_path, canary):
    dest = tmp_path / "dest"
    target = canary.rel_from(str(dest))
    entries = [{"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
               {"name": os.path.join(canary.root, "etc", "blk"), "type": "block", "devMajor": 7, "devMinor": 0},
               {"name": "fifo", "type": "fifo"}]
    r = open_blob(hostile_layer(entries))
    extract(r, str(dest))
    assert stat.S_ISCHR(os.lstat(dest / "dev" / "null").st_mode)
    assert stat.S_ISBLK(os.lstat(dest / canary.root.lstrip("/") / "etc" / "blk").st_mode)
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)
    with pytest.raises(UnsafeEntryError):
        open_blob(hostile_layer([{"name": os.path.join(target, "etc", "blk"), "type": "block", "devMajor": 7}]))


@pytest.mark.parametrize("entry", [{"name": "a\0b", "type": "dir"},
                                   {"name": "ln", "type": "symlink", "linkName": "/etc\0"},
                                   {"name": "x", "type": "dir", "xattrs": {"user.a\0b": "eA=="}}])
def test_nul_bytes_in_names_are_format_errors(entry):
    with pytest.raises(FormatError, match="NUL byte"):
        open_blob(hostile_layer([entry]))


def test_deep_names_do_not_exhaust_the_stack():
    deep = "/".join(["d"] * 5000) + "/f"
    r = open_blob(hostile_layer([{"name": deep, "type": "reg"}], {deep: b"x"}))
    assert r.read_file(deep) == b"x"
    assert sum(1 for _ in r.walk()) == 5001


def test_toc_entry_count_is_capped_before_the_json_is_built(monkeypatch):
    from lazybuild.estargz import toc as toc_module

    entries = [{"name": f"d{i}/", "type": "dir"} for i in range(1000)]
    blob = layer(entries)
    assert len(open_blob(blob).entries) == 1000
    monkeypatch.setattr(toc_module, "MAX_TOC_ENTRIES", 999)
    with pytest.raises(LimitExceeded, match=r"evil-layer: TOC holds up to 1001 entries, more than the 999 cap"):
        open_blob(blob)


def test_deeply_nested_toc_json_is_a_format_error():
    with pytest.raises(FormatError, match="nested too deeply"):
        parse_toc_json(b"[" * 100000 + b"]" * 100000)


# --- property tests: no input hangs, allocates without bound, or raises anything but our errors -------

def _real_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("etc/", None), ("etc/passwd", b"root:x:0:0\n" * 40), ("a-very-long-name-" * 8, b"long")):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data or b"")
            info.pax_headers = {"SCHILY.xattr.user.k": "v"}
            tf.addfile(info, io.BytesIO(data) if data else None)
        link = tarfile.TarInfo("ln")
        link.type, link.linkname = tarfile.SYMTYPE, "etc/passwd"
        tf.addfile(link)
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("gnu-long-" * 20)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()[:-1024] + gnu.getvalue()


REAL_TAR = _real_tar()


def _real_blob(kind: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.tar")
        with open(src, "wb") as f:
            f.write(REAL_TAR)
        out = io.BytesIO()
        build(src, out, compression=kind, chunk_size=128)
        return out.getvalue()


REAL_BLOBS = {"gzip": _real_blob("gzip"), "zstd": _real_blob("zstd")}
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw, base: bytes, tail_bias: int | None = None):
    """BASE with a few bytes flipped, ranges cut or repeated, or numbers planted (near the tail when asked)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "dup", "plant", "truncate"]))
        lo = max(0, len(data) - tail_bias) if tail_bias else 0
        if not data:
            break
        at = draw(st.integers(lo, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 600))]
        elif op == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 600))]
        elif op == "plant":
            data[at:at + 8] = draw(st.sampled_from([b"\xff" * 8, b"\x80" + bytes(6) + b"\x10", b"77777777",
                                                    struct.pack("<Q", 1 << 62), bytes(8), b"-0000001"]))
        else:
            del data[at:]
    return bytes(data)


def _only_our_errors(fn, *args) -> None:
    try:
        fn(*args)
    except EStargzError:
        pass


def fix_checksums(data: bytes) -> bytes:
    """Recompute the checksum of every block that looks like a tar header, so a mutation reaches the
    parsing behind the checksum check (sizes, PAX records, long names) instead of stopping at it."""
    out = bytearray(data)
    for at in range(0, len(out) - 511, 512):
        if out[at + 257:at + 262] == b"ustar":
            out[at + 148:at + 156] = b" " * 8
            out[at + 148:at + 156] = b"%06o\0 " % (sum(out[at:at + 512]) & 0o777777)
    return bytes(out)


TAR_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1), (329, 8), (337, 8)]  # mode..devminor


@st.composite
def tar_field_planted(draw):
    """REAL_TAR with header fields (mode, ids, size, mtime, type, device) set to edge values: negative
    and huge base-256 numbers, non-octal text, other entry types; checksums made right again."""
    data = bytearray(REAL_TAR)
    headers = [at for at in range(0, len(data) - 511, 512) if data[at + 257:at + 262] == b"ustar"]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(headers))
        off, width = draw(st.sampled_from(TAR_FIELDS))
        if width == 1:
            value = draw(st.sampled_from(b"0125LKxXgSV7M\0"))
            data[at + off] = value
            continue
        n = draw(st.sampled_from([-1, -512, -(1 << 40), 1 << 40, 1 << 62, 0, 511, 513]))
        value = draw(st.sampled_from([
            (b"\xff" if n < 0 else b"\x80") + n.to_bytes(width - 1, "big", signed=True) if abs(n) < 1 << 60 else b"\x80" * width,
            b"%0*o" % (width - 1, abs(n) % (8 ** (width - 1))) + b"\0",
            b"-" + b"1" * (width - 1), b" " * width, bytes(width), b"9" * width,
        ]))
        data[at + off:at + off + width] = value[:width].ljust(width, b"\0")
    return fix_checksums(bytes(data))


@PROPERTY
@given(st.one_of(tar_field_planted(), mutated(REAL_TAR).map(fix_checksums), mutated(REAL_TAR),
                 st.binary(max_size=3000)))
def test_property_tar_reader(data):
    with bounded(peak=4 * MiB):
        _only_our_errors(members_of, data)


def _open_and_use(data: bytes) -> None:
    r = open_blob(data)
    for node in r.walk():
        if node.entry.type == "reg":
            r.read_file(node.path)


@PROPERTY
@given(st.sampled_from(["gzip", "zstd"]).flatmap(lambda k: mutated(REAL_BLOBS[k], tail_bias=3000)))
def test_property_footer_and_toc_of_mutated_blobs(data):
    with bounded(peak=8 * MiB):
        _only_our_errors(_open_and_use, data)


@PROPERTY
@given(st.sampled_from(["gzip", "zstd"]).flatmap(lambda k: st.tuples(st.just(REAL_BLOBS[k]), st.binary(min_size=40, max_size=120))))
def test_property_footer_parser_on_arbitrary_tails(pair):
    blob, tail = pair
    with bounded(peak=8 * MiB):
        _only_our_errors(_open_and_use, blob[:-len(tail)] + tail)
        _only_our_errors(_open_and_use, tail)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName", "groupName", "offset",
          "innerOffset", "devMajor", "devMinor", "xattrs", "digest", "chunkOffset", "chunkSize", "chunkDigest"]


@st.composite
def toc_documents(draw):
    base = json.loads(LayerReader.fetch_toc(BytesBlob(REAL_BLOBS["gzip"]))[2])
    entries = base["entries"]
    for _ in range(draw(st.integers(0, 5))):
        e = entries[draw(st.integers(0, len(entries) - 1))]
        e[draw(st.sampled_from(FIELDS))] = draw(JSON | st.sampled_from(["sha256:../../x", "reg", "chunk", "symlink",
                                                                          "hardlink", "dir", "etc/passwd", "..",
                                                                          -1, 0, 1 << 63]))
    if draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), draw(JSON))
    return json.dumps(draw(st.sampled_from([base, {"entries": entries}, entries, {"version": 2}]))
                      if draw(st.integers(0, 9)) == 0 else base).encode()


@PROPERTY
@given(st.one_of(toc_documents(), st.binary(max_size=500).map(lambda b: b'{"entries": [' + b)))
def test_property_toc_parser(raw):
    head = REAL_BLOBS["gzip"][:open_blob(REAL_BLOBS["gzip"]).toc_offset]
    sink = _Sink()
    sink.write(head)
    Gzip().write_trailer(sink, len(head), [raw])
    with bounded(peak=8 * MiB):
        _only_our_errors(parse_toc_json, raw)
        _only_our_errors(_open_and_use, sink.getvalue())


def test_property_extract_of_hostile_tocs_stays_inside(tmp_path):
    """Random TOCs of names, symlinks and hardlinks aimed at a host canary: extraction either refuses
    with our error or writes only under its destination; the canary never changes."""
    from support.canary import Canary

    canary = Canary()
    dests = tmp_path / "dests"
    dests.mkdir()
    up = canary.rel_from(str(dests / "tmpname" / "x"))  # ../.. from a destination to the canary
    parts = st.sampled_from(["a", "b", "..", ".", "", "etc", "cron.d", up, canary.root])
    names = st.lists(parts, min_size=1, max_size=4).map("/".join)
    targets = st.sampled_from(["a", "b", "a/b", "..", "../..", "/", up, up + "/etc/cron.d", canary.root,
                               canary.writable_dir, canary.secret, canary.victim])
    entries = st.lists(st.fixed_dictionaries({
        "name": names, "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "fifo"]), "linkName": targets}),
        min_size=1, max_size=6)

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(entries)
    def extract_one(es):
        dest = tempfile.mkdtemp(dir=dests)
        try:
            r = open_blob(hostile_layer(es, {e["name"]: b"pwn " + e["name"].encode() for e in es}))
            with bounded(peak=16 * MiB):
                extract(r, os.path.join(dest, "x"))
        except EStargzError:
            pass
        canary.check()
        assert os.listdir(dest) in ([], ["x"])

    try:
        extract_one()
        canary.check()
    finally:
        canary.remove()
