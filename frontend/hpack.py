"""HPACK (RFC 7541) header decoding for the frontend's gRPC client (`wire.py`).

Only decoding: our own requests are sent as literals without indexing, which needs no table. The
peer (buildkitd, grpc-go) indexes and Huffman-codes what it sends, so both are decoded here. Input
comes from buildkitd; sizes are still bounded (integers, strings, the dynamic table).
"""

from __future__ import annotations

from lazybuild.errors import RemoteError


class HpackError(RemoteError):
    """A header block that breaks RFC 7541 (the connection cannot go on: the table is out of step)."""


# RFC 7541 Appendix A.
STATIC_TABLE = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
    ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""), ("date", ""),
    ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""), ("if-match", ""),
    ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""),
    ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
    ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""),
    ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]

# RFC 7541 Appendix B: the code length of each symbol (256 is EOS). The code is canonical (codes of one
# length are consecutive in symbol order, each length starting where the shorter ones end), so the
# lengths alone define it.
_CODE_LENGTHS = {
    5: b"012aceiost",
    6: b" %-./3456789=A_bdfghlmnpru",
    7: b":BCDEFGHIJKLMNOPQRSTUVWYjkqvwxyz",
    8: b"&*,;XZ",
    10: b"!\"()?",
    11: b"'+|",
    12: b"#>",
    13: b"\x00$@[]~",
    14: b"^}",
    15: b"<`{",
    19: bytes([92, 195, 208]),
    20: bytes([128, 130, 131, 162, 184, 194, 224, 226]),
    21: bytes([153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230]),
    22: bytes([129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181, 185, 186, 187, 189,
               190, 196, 198, 228, 232, 233]),
    23: bytes([1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166, 168, 174, 175,
               180, 182, 183, 188, 191, 197, 231, 239]),
    24: bytes([9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237]),
    25: bytes([199, 207, 234, 235]),
    26: bytes([192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255]),
    27: bytes([203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252, 253, 254]),
    28: bytes([2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30, 31, 127,
               220, 249]),
    30: bytes([10, 13, 22]),  # and EOS, the last code: thirty 1 bits
}
EOS = 256


def _canonical() -> dict[tuple[int, int], int]:
    """(length, code) -> symbol, assigning canonical codes in (length, symbol) order."""
    table, code, prev = {}, 0, 5
    for length in sorted(_CODE_LENGTHS):
        symbols = list(_CODE_LENGTHS[length]) + ([EOS] if length == 30 else [])
        code <<= length - prev
        prev = length
        for sym in symbols:
            table[(length, code)] = sym
            code += 1
    return table


_HUFFMAN = _canonical()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = _HUFFMAN.get((length, code))
            if sym is not None:
                if sym == EOS:
                    raise HpackError("Huffman string holds EOS")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise HpackError("bad Huffman code")
    # What is left is padding: fewer than 8 bits, all 1 (the start of EOS).
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("bad Huffman padding")
    return bytes(out)


class Decoder:
    """One connection's decoding state: the dynamic table, in step with the peer's encoder."""

    def __init__(self, max_table: int = 4096, max_string: int = 1 << 20):
        self.max_table = max_table  # what we allow (SETTINGS_HEADER_TABLE_SIZE, default 4096)
        self.table_size = max_table  # what the peer set with size updates, <= max_table
        self.max_string = max_string
        self.dynamic: list[tuple[str, str]] = []  # newest first
        self.used = 0

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers, pos = [], 0
        while pos < len(block):
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = self._int(block, pos, 7)
                headers.append(self._entry(index))
            elif b & 0x40:  # literal with incremental indexing
                name, value, pos = self._literal(block, pos, 6)
                headers.append((name, value))
                self._add(name, value)
            elif b & 0x20:  # dynamic table size update
                size, pos = self._int(block, pos, 5)
                if size > self.max_table:
                    raise HpackError(f"table size update {size} over {self.max_table}")
                self.table_size = size
                self._evict()
            else:  # literal without indexing / never indexed
                name, value, pos = self._literal(block, pos, 4)
                headers.append((name, value))
        return headers

    def _int(self, data: bytes, pos: int, prefix: int) -> tuple[int, int]:
        mask = (1 << prefix) - 1
        value = data[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            if pos >= len(data) or shift > 28:
                raise HpackError("truncated or oversized integer")
            b = data[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos

    def _string(self, data: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(data):
            raise HpackError("truncated string")
        huffman = data[pos] & 0x80
        length, pos = self._int(data, pos, 7)
        if length > self.max_string or pos + length > len(data):
            raise HpackError("truncated or oversized string")
        raw = data[pos:pos + length]
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), pos + length

    def _literal(self, data: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = self._int(data, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return name, value, pos

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        i = index - len(STATIC_TABLE) - 1
        if 0 <= i < len(self.dynamic):
            return self.dynamic[i]
        raise HpackError(f"header index {index} out of range")

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        self.used += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.used > self.table_size:
            name, value = self.dynamic.pop()
            self.used -= len(name) + len(value) + 32
