"""Unary gRPC calls over one HTTP/2 connection on a pair of file descriptors (RFC 9113, gRPC over HTTP/2).

buildkitd serves the gateway API on the frontend's stdin/stdout: HTTP/2 cleartext with prior knowledge.
grpcio cannot dial a pair of pipes (it needed two relay threads and a socket), and importing it costs
more than this whole client, on every build. h2 (python-hyper, sans-IO) would fit, but importing it takes
~21 ms here against ~5 ms for this module and hpack.py together, and every build pays it. What a frontend needs is small: unary calls, several at a
time (one stream each), flow control both ways, HPACK decoding (`hpack.py`), trailers with grpc-status.

One daemon thread reads frames; callers write theirs under a lock and wait for their stream to end.
"""

from __future__ import annotations

import os
import struct
import threading

from lazybuild.errors import RemoteError

from .hpack import Decoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 2, 4, 5
FRAME_LIMIT = 16384  # the default SETTINGS_MAX_FRAME_SIZE, both ways: we never raise ours
HEADER_BLOCK_LIMIT = 1 << 20
WINDOW = (1 << 31) - 1  # what we let the peer send: answers are bounded by max_message instead
CANCEL = 8  # RST_STREAM code
UNKNOWN, INTERNAL, UNAVAILABLE = 2, 13, 14  # gRPC status codes for failures of the transport


class ProtocolError(RemoteError):
    """The peer broke HTTP/2; the connection is given up."""


class CallError(RemoteError):
    """A call that ended without an answer: the message (grpc-message, decoded) and the gRPC status code."""

    def __init__(self, message: str, code: int = UNKNOWN):
        super().__init__(message)
        self.code, self.message = code, message


class _Stream:
    def __init__(self, send_window: int):
        self.send_window = send_window
        self.headers: list[tuple[str, str]] = []  # the response headers, then the trailers
        self.data = bytearray()
        self.done = False
        self.error: CallError | None = None


def _percent_decode(text: str) -> str:
    """grpc-message is percent-encoded UTF-8."""
    if "%" not in text:
        return text
    parts = text.encode("latin-1").split(b"%")
    out = bytearray(parts[0])
    for part in parts[1:]:
        try:
            out += bytes([int(part[:2], 16)]) + part[2:]
        except ValueError:
            out += b"%" + part
    return out.decode("utf-8", "replace")


class Connection:
    """An HTTP/2 client connection reading from `rfd` and writing to `wfd`; `call()` from any thread."""

    def __init__(self, rfd: int = 0, wfd: int = 1, max_message: int = 16 << 20):
        self.rfd, self.wfd, self.max_message = rfd, wfd, max_message
        self._write_lock = threading.Lock()  # a frame is written whole; stream ids open in order
        self._state = threading.Condition()  # streams, windows, `_closed`
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._send_window = 65535  # the connection's, as granted by the peer
        self._peer_initial_window = 65535
        self._peer_max_frame = FRAME_LIMIT
        self._received = 0  # bytes of DATA since we last opened the connection window again
        self._closed: str | None = None
        self._decoder = Decoder()
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, WINDOW)
        self._write(PREFACE + self._frame(SETTINGS, 0, 0, settings)
                    + self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - 65535)))
        threading.Thread(target=self._read_loop, daemon=True, name="http2-reader").start()

    # -- calls

    def call(self, path: str, request: bytes) -> bytes:
        """Send one message to `path` (/package.Service/Method), return the one message answered."""
        body = b"\0" + struct.pack(">I", len(request)) + request
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        block = b"".join(b"\0" + _string(n) + _string(v) for n, v in headers)  # literals, never indexed
        stream, sid = _Stream(0), 0
        try:
            with self._write_lock:  # ids must reach the peer in increasing order
                with self._state:
                    if self._closed:
                        raise CallError(self._closed, UNAVAILABLE)
                    sid, self._next_id = self._next_id, self._next_id + 2
                    stream.send_window = self._peer_initial_window
                    self._streams[sid] = stream
                self._write(self._frame(HEADERS, END_HEADERS, sid, block))
            self._send_data(sid, stream, body)
            with self._state:
                while not stream.done:
                    self._state.wait()
        finally:
            with self._state:
                self._streams.pop(sid, None)
        if stream.error:
            raise stream.error
        return self._answer(stream)

    def _send_data(self, sid: int, stream: _Stream, body: bytes) -> None:
        view = memoryview(body)
        while view:
            with self._state:
                while not stream.done and (self._send_window <= 0 or stream.send_window <= 0):
                    self._state.wait()
                if stream.done:  # answered (or failed) before the request was whole: the peer gave up on it
                    return
                n = min(len(view), self._send_window, stream.send_window, self._peer_max_frame)
                self._send_window -= n
                stream.send_window -= n
            chunk, view = view[:n], view[n:]
            with self._write_lock:
                self._write(self._frame(DATA, 0 if view else END_STREAM, sid, chunk))

    def _answer(self, stream: _Stream) -> bytes:
        fields = dict(stream.headers)
        status = fields.get("grpc-status")
        if status is None:
            raise CallError(f"no grpc-status in the answer (HTTP status {fields.get(':status', 'none')})",
                            UNKNOWN if fields.get(":status") == "200" else UNAVAILABLE)
        if status != "0":
            raise CallError(_percent_decode(fields.get("grpc-message", "")), int(status) if status.isdigit() else UNKNOWN)
        data = stream.data
        if len(data) < 5 or data[0] != 0:
            raise CallError("the answer holds no message" if len(data) < 5 else "compressed answer", INTERNAL)
        length = struct.unpack(">I", data[1:5])[0]
        if len(data) != 5 + length:
            raise CallError(f"the answer holds {len(data) - 5} bytes for a message of {length}", INTERNAL)
        return bytes(data[5:])

    # -- frames

    @staticmethod
    def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + bytes(payload)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except OSError as e:
            raise CallError(f"gateway connection lost: {e}", UNAVAILABLE) from None

    def _read_loop(self) -> None:
        buf = bytearray()
        block, block_sid, block_flags = bytearray(), 0, 0  # a header block being continued
        try:
            while True:
                while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                    if len(buf) >= 3 and int.from_bytes(buf[:3], "big") > FRAME_LIMIT:
                        raise ProtocolError("frame over SETTINGS_MAX_FRAME_SIZE")
                    data = os.read(self.rfd, 1 << 16)
                    if not data:
                        raise EOFError("buildkitd closed the gateway connection")
                    buf += data
                length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload = bytes(buf[9:9 + length])
                del buf[:9 + length]
                if block_sid and kind != CONTINUATION:
                    raise ProtocolError("header block interrupted")
                if kind == DATA:
                    self._on_data(sid, flags, payload)
                elif kind in (HEADERS, CONTINUATION):
                    if kind == HEADERS:
                        payload = self._unpad(flags, payload)
                        if flags & PRIORITY:
                            payload = payload[5:]
                        block, block_sid, block_flags = bytearray(payload), sid, flags
                    elif sid != block_sid:
                        raise ProtocolError("CONTINUATION without its HEADERS")
                    else:
                        block += payload
                        if len(block) > HEADER_BLOCK_LIMIT:
                            raise ProtocolError("header block over 1 MiB")
                        block_flags |= flags & END_HEADERS
                    if block_flags & END_HEADERS:
                        self._on_headers(block_sid, block_flags, self._decoder.decode(bytes(block)))
                        block, block_sid = bytearray(), 0
                elif kind == RST_STREAM:
                    code = int.from_bytes(payload[:4], "big")
                    self._end(sid, CallError(f"stream reset by buildkitd (code {code})", UNAVAILABLE if code == 7 else INTERNAL))
                elif kind == SETTINGS and not flags & ACK:
                    self._on_settings(payload)
                elif kind == PING and not flags & ACK:
                    with self._write_lock:
                        self._write(self._frame(PING, ACK, 0, payload))
                elif kind == GOAWAY:
                    last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                    self._goaway(last, f"buildkitd closed the gateway connection (GOAWAY {payload[8:].decode('utf-8', 'replace')})")
                elif kind == WINDOW_UPDATE:
                    with self._state:
                        inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                        if sid == 0:
                            self._send_window += inc
                        elif sid in self._streams:
                            self._streams[sid].send_window += inc
                        self._state.notify_all()
                elif kind == PUSH_PROMISE:
                    raise ProtocolError("PUSH_PROMISE, which we disabled")
                # PRIORITY, SETTINGS/PING acks and unknown kinds need nothing
        except Exception as e:  # a dead reader would leave every call waiting: fail them instead
            self._goaway(-1, f"gateway connection lost: {type(e).__name__}: {e}")

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        pad = payload[0]
        if pad >= len(payload):
            raise ProtocolError("padding longer than the frame")
        return payload[1:len(payload) - pad]

    def _on_data(self, sid: int, flags: int, payload: bytes) -> None:
        size = len(payload)
        data = self._unpad(flags, payload)
        frames = b""  # written after _state is released: the lock order is _write_lock, then _state
        with self._state:
            self._received += size
            stream = self._streams.get(sid)
            if stream and not stream.done:
                stream.data += data
                if len(stream.data) > self.max_message + 5:
                    frames += self._frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL))
                    self._end_locked(sid, CallError(f"answer over {self.max_message} bytes", INTERNAL))
            if self._received > WINDOW // 2:
                frames += self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received))
                self._received = 0
        if frames:
            with self._write_lock:
                self._write(frames)
        if flags & END_STREAM:
            self._end(sid, None)

    def _on_headers(self, sid: int, flags: int, headers: list[tuple[str, str]]) -> None:
        with self._state:
            stream = self._streams.get(sid)
            if stream:
                stream.headers += headers
        if flags & END_STREAM:
            self._end(sid, None)

    def _on_settings(self, payload: bytes) -> None:
        with self._state:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i:i + 6])
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    for stream in self._streams.values():
                        stream.send_window += value - self._peer_initial_window
                    self._peer_initial_window = value
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self._peer_max_frame = min(value, FRAME_LIMIT)
            self._state.notify_all()
        with self._write_lock:
            self._write(self._frame(SETTINGS, ACK, 0, b""))

    def _end(self, sid: int, error: CallError | None) -> None:
        with self._state:
            self._end_locked(sid, error)

    def _end_locked(self, sid: int, error: CallError | None) -> None:
        stream = self._streams.get(sid)
        if stream and not stream.done:
            stream.done, stream.error = True, error
            self._state.notify_all()

    def _goaway(self, last: int, why: str) -> None:
        """Fail the streams the peer will not answer (all of them when `last` is -1) and refuse new calls."""
        with self._state:
            self._closed = why
            for sid in list(self._streams):
                if last < 0 or sid > last:
                    self._end_locked(sid, CallError(why, UNAVAILABLE))


def _string(text: str) -> bytes:
    """An HPACK string literal, not Huffman-coded."""
    raw = text.encode("latin-1")
    n = len(raw)
    if n < 127:
        return bytes([n]) + raw
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + raw
