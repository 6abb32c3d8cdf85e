"""The frontend's own gRPC client (frontend/wire.py, hpack.py) against a real gRPC server (grpcio's).

buildkitd serves the gateway on the frontend's stdin/stdout; here grpcio serves the same LLBBridge service
on a Unix socket and the client gets the socket's fd as both ends. BuildKit itself (grpc-go) is the peer in
tests/integration/test_frontend.py.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent import futures

import grpc
import pytest

from lazybuild.frontend import hpack
from lazybuild.frontend.gateway import Bridge, GatewayError
from lazybuild.frontend.llb.proto import gateway_pb2 as gw
from lazybuild.frontend.llb.proto import gateway_pb2_grpc as gw_grpc
from lazybuild.frontend.wire import Connection


def test_hpack_rfc7541_request_examples():
    """RFC 7541 C.4: three requests on one connection, Huffman-coded, sharing the dynamic table."""
    d = hpack.Decoder()
    assert d.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    assert d.decode(bytes.fromhex("828684be5886a8eb10649cbf")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
        ("cache-control", "no-cache")]
    assert d.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")) == [
        (":method", "GET"), (":scheme", "https"), (":path", "/index.html"), (":authority", "www.example.com"),
        ("custom-key", "custom-value")]
    assert d.used == 164  # the table size RFC 7541 gives after C.4.3


def test_hpack_refuses_bad_huffman_padding():
    with pytest.raises(hpack.HpackError, match="padding"):  # 8 bits of padding
        hpack.huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ffff"))
    with pytest.raises(hpack.HpackError, match="padding"):  # 'a' (00011), then padding 110
        hpack.huffman_decode(b"\x1e")
    assert hpack.huffman_decode(b"\x1f") == b"a"


class Servicer(gw_grpc.LLBBridgeServicer):
    def Ping(self, request, context):
        return gw.PongResponse(Workers=[])

    def ReadFile(self, request, context):
        if request.FilePath == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such file: missing – 100% gone")
        return gw.ReadFileResponse(Data=bytes(range(256)) * (int(request.FilePath) // 256))

    def Solve(self, request, context):  # echoes the size of what it got, so big requests are checked whole
        return gw.SolveResponse(ref=f"{request.Definition.ByteSize()}:{len(getattr(request.Definition, 'def'))}")


@pytest.fixture
def bridge(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 16 << 20),
                                                                ("grpc.max_send_message_length", 16 << 20)])
    gw_grpc.add_LLBBridgeServicer_to_server(Servicer(), server)
    path = str(tmp_path / "gw.sock")
    server.add_insecure_port("unix:" + path)
    server.start()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    yield Bridge(Connection(sock.fileno(), sock.fileno(), max_message=16 << 20))
    sock.close()
    server.stop(None)


def test_calls_big_answers_and_requests_and_errors(bridge):
    assert bridge.ping().llb  # no lists in the answer: BuildKit's defaults
    data = bridge.read_file("", str(5 << 20))  # past every flow-control window the server starts with
    assert data == bytes(range(256)) * (5 << 12)
    definition = gw.SolveRequest().Definition
    getattr(definition, "def").extend([os.urandom(1 << 20) for _ in range(3)])
    assert bridge.solve(definition) == f"{definition.ByteSize()}:3"
    with pytest.raises(GatewayError, match="ReadFile missing: no such file: missing – 100% gone"):
        bridge.read_file("", "missing")


def test_concurrent_calls(bridge):
    bridge.ping()
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            results[i] = len(bridge.read_file("", str((i + 1) << 16)))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == {i: (i + 1) << 16 for i in range(16)}


def test_answer_over_the_limit_is_refused(tmp_path, bridge):
    bridge.connection.max_message = 1 << 20
    with pytest.raises(GatewayError, match="over 1048576 bytes"):
        bridge.read_file("", str(2 << 20))
    assert bridge.read_file("", "1024") == bytes(range(256)) * 4  # the connection goes on


def test_a_peer_that_goes_away_fails_the_calls_instead_of_hanging():
    ours, theirs = socket.socketpair()
    bridge = Bridge(Connection(ours.fileno(), ours.fileno()))
    failed = []

    def call() -> None:
        try:
            bridge.ping()
        except GatewayError as e:
            failed.append(str(e))

    t = threading.Thread(target=call)
    t.start()
    assert theirs.recv(24) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    theirs.close()
    t.join(10)
    assert not t.is_alive() and failed and "gateway connection lost" in failed[0]
    with pytest.raises(GatewayError, match="gateway connection lost"):
        bridge.ping()  # and the next call is refused at once
    ours.close()


def test_an_early_ping_is_taken_by_the_next_ping(bridge):
    bridge.start_ping()
    assert bridge.ping().llb and bridge._early_ping is None
    assert bridge.ping().llb  # a call of its own


def test_an_early_ping_that_failed_fails_the_next_ping():
    ours, theirs = socket.socketpair()
    bridge = Bridge(Connection(ours.fileno(), ours.fileno()))
    theirs.close()
    bridge.start_ping()
    with pytest.raises(GatewayError, match="gateway connection lost"):
        bridge.ping()
    ours.close()
