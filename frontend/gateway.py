"""The gateway side of a BuildKit frontend: stdio relay and an LLBBridge client.

buildkitd runs the frontend image with gRPC (HTTP/2 cleartext, prior knowledge) on its stdin/stdout.
grpcio cannot dial a pair of pipes, so two daemon threads relay them to an abstract Unix socket that
grpcio dials. The threads must be daemons: buildkitd takes the result when the process exits and never
closes stdin. Nothing may ever be written to stdout: it is the HTTP/2 stream.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass

import grpc

from lazybuild.errors import RemoteError

from .llb.proto import gateway_pb2 as gw
from .llb.proto import gateway_pb2_grpc as gw_grpc
from .llb.proto import ops_pb2 as pb
from .llb.proto import status_pb2

MAX_RECEIVE = 16 << 20  # ReadFile answers can be large
REQUEST_LIMIT = 4 << 20  # grpc-go's default limit in BuildKit before v0.14 (Docker 20.10)

# What a gateway that answers Ping without lists supports (BuildKit's frozen defaults).
DEFAULT_FRONTEND_CAPS = {"solve.base", "solve.inlinereturn", "resolveimage", "readfile"}
DEFAULT_LLB_CAPS = {"source.image", "source.local", "source.localunique", "source.git", "source.http",
                    "source.http.checksum", "exec.meta.base", "exec.mount.bind", "exec.mount.cache",
                    "exec.mount.selector", "file.base", "constraints", "platform", "meta.description",
                    "meta.ignorecache", "meta.exportcache"}


class GatewayError(RemoteError):
    """A gateway call failed; the message names the call and BuildKit's answer."""


def _pump(read, write) -> None:
    try:
        while True:
            data = read()
            if not data:
                break
            write(data)
    except OSError:
        pass


class StdioRelay:
    """Accepts grpcio's one connection on an abstract Unix socket and copies bytes to/from fds 0/1."""

    def __init__(self, stdin: int = 0, stdout: int = 1):
        self.name = f"lazybuild-frontend-{os.getpid()}-{os.urandom(4).hex()}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.name)  # abstract: needs no writable directory in the image
        self.listener.listen(1)
        self.stdin, self.stdout = stdin, stdout
        threading.Thread(target=self._serve, daemon=True, name="stdio-relay").start()

    @property
    def target(self) -> str:
        return "unix-abstract:" + self.name

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()

        def write_out(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(self.stdout, view):]

        threading.Thread(target=_pump, args=(lambda: os.read(self.stdin, 1 << 16), conn.sendall),
                         daemon=True, name="stdin-to-grpc").start()
        threading.Thread(target=_pump, args=(lambda: conn.recv(1 << 16), write_out),
                         daemon=True, name="grpc-to-stdout").start()


@dataclass
class Caps:
    frontend: set[str]
    llb: set[str]
    workers: list[dict]

    def has(self, cap: str) -> bool:
        return cap in self.llb

    @property
    def default_platform(self) -> pb.Platform | None:
        for w in self.workers:
            if w["platforms"]:
                return w["platforms"][0]
        return None

    @property
    def large_requests(self) -> bool:
        # No cap says "16 MiB messages"; BuildKit v0.14 brought both this cap and the larger limit.
        return "file.copy.alwaysreplaceexistingdestpaths" in self.llb


class Bridge:
    """LLBBridge calls with errors turned into GatewayError."""

    def __init__(self, channel: grpc.Channel):
        self.stub = gw_grpc.LLBBridgeStub(channel)
        self.caps: Caps | None = None

    @classmethod
    def from_stdio(cls) -> "Bridge":
        relay = StdioRelay()
        channel = grpc.insecure_channel(relay.target, options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE), ("grpc.max_send_message_length", MAX_RECEIVE)])
        bridge = cls(channel)
        bridge._keep = (relay, channel)
        return bridge

    def _call(self, name: str, request, what: str = ""):
        try:
            return getattr(self.stub, name)(request)
        except grpc.RpcError as e:
            detail = e.details() if hasattr(e, "details") else str(e)
            raise GatewayError(f"{name}{' ' + what if what else ''}: {detail}") from None

    def ping(self) -> Caps:
        pong = self._call("Ping", gw.PingRequest())
        fcaps = {c.ID for c in pong.FrontendAPICaps if c.Enabled} if pong.FrontendAPICaps else set(DEFAULT_FRONTEND_CAPS)
        lcaps = {c.ID for c in pong.LLBCaps if c.Enabled} if pong.LLBCaps else set(DEFAULT_LLB_CAPS)
        workers = [{"id": w.ID, "platforms": list(w.platforms)} for w in pong.Workers]
        self.caps = Caps(fcaps, lcaps, workers)
        return self.caps

    def solve(self, definition: pb.Definition | None, *, evaluate: bool = False, cache_imports: list[dict] | None = None,
              frontend: str = "", frontend_opt: dict[str, str] | None = None, what: str = "") -> str:
        """Solve a Definition (or run another frontend) and return the ref id (lazy unless `evaluate`)."""
        req = gw.SolveRequest(allowResultReturn=True, allowResultArrayRef=True, Evaluate=evaluate, Frontend=frontend,
                              FrontendOpt=frontend_opt or {})
        if definition is not None:
            req.Definition.CopyFrom(definition)
        for c in cache_imports or []:
            req.CacheImports.add(Type=c["Type"], Attrs=c.get("Attrs", {}))
        self._check_size(req, what or "solve")
        res = self._call("Solve", req, what)
        if res.result.WhichOneof("result") == "ref":
            return res.result.ref.id
        if res.result.WhichOneof("result") == "refDeprecated":
            return res.result.refDeprecated
        return res.ref

    def _check_size(self, req, what: str) -> None:
        size = req.ByteSize()
        if self.caps and not self.caps.large_requests and size > REQUEST_LIMIT:
            raise GatewayError(f"{what}: the build definition is {size >> 20} MiB, over the 4 MiB this BuildKit "
                               "accepts (before v0.14); make heredocs or inline files smaller")

    def read_file(self, ref: str, path: str, offset: int | None = None, length: int | None = None) -> bytes:
        req = gw.ReadFileRequest(Ref=ref, FilePath=path)
        if offset is not None:
            req.Range.Offset, req.Range.Length = offset, length or 0
        return self._call("ReadFile", req, path).Data

    def stat_file(self, ref: str, path: str):
        return self._call("StatFile", gw.StatFileRequest(Ref=ref, Path=path), path).stat

    def read_dir(self, ref: str, path: str, pattern: str = ""):
        return list(self._call("ReadDir", gw.ReadDirRequest(Ref=ref, DirPath=path, IncludePattern=pattern), path).entries)

    def resolve_image_config(self, ref: str, plat: pb.Platform | None, mode: str, session_id: str) -> tuple[str, dict]:
        req = gw.ResolveImageConfigRequest(Ref=ref, ResolveMode=mode, LogName=f"[internal] load metadata for {ref}",
                                           SessionID=session_id)
        if plat is not None:
            req.Platform.CopyFrom(plat)
        res = self._call("ResolveImageConfig", req, ref)
        return res.Digest, json.loads(res.Config or b"{}")

    def inputs(self) -> dict[str, pb.Definition]:
        if not self.caps or "frontend.inputs" not in self.caps.frontend:
            return {}
        return dict(self._call("Inputs", gw.InputsRequest()).Definitions)

    def return_result(self, result: gw.Result) -> None:
        self._call("Return", gw.ReturnRequest(result=result))

    def return_error(self, code: int, message: str) -> None:
        self._call("Return", gw.ReturnRequest(error=status_pb2.Status(code=code, message=message)))
