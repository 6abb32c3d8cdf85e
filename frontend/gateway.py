"""The gateway side of a BuildKit frontend: an LLBBridge client on stdin/stdout.

buildkitd runs the frontend image with gRPC (HTTP/2 cleartext, prior knowledge) on its stdin/stdout;
`wire.Connection` speaks it there directly (grpcio cannot dial a pair of pipes, and importing it costs
more than the client, on every build). buildkitd takes the result when the process exits and never
closes stdin. Nothing may ever be written to stdout: it is the HTTP/2 stream.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from lazybuild.errors import RemoteError

from .llb.proto import gateway_pb2 as gw
from .llb.proto import ops_pb2 as pb
from .llb.proto import status_pb2
from .wire import CallError, Connection

SERVICE = "/moby.buildkit.v1.frontend.LLBBridge/"
# Each call's answer type (the requests carry their own).
ANSWERS = {"Ping": gw.PongResponse, "Solve": gw.SolveResponse, "ReadFile": gw.ReadFileResponse,
           "ReadDir": gw.ReadDirResponse, "StatFile": gw.StatFileResponse,
           "ResolveImageConfig": gw.ResolveImageConfigResponse, "Inputs": gw.InputsResponse,
           "Return": gw.ReturnResponse, "Warn": gw.WarnResponse}
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

    _stdio: "Bridge | None" = None  # stdin/stdout carry one connection: every caller shares it

    def __init__(self, connection: Connection):
        self.connection = connection
        self.caps: Caps | None = None
        self._early_ping: threading.Thread | None = None
        self._early_pong: gw.PongResponse | Exception | None = None

    @classmethod
    def from_stdio(cls) -> "Bridge":
        if cls._stdio is None:
            cls._stdio = cls(Connection(0, 1, max_message=MAX_RECEIVE))
        return cls._stdio

    def start_ping(self) -> None:
        """Send Ping now, on a thread, for the next ping() to take: its round trip (the first call also waits
        for buildkitd's side of the connection) then overlaps whatever the caller does meanwhile."""
        def ping() -> None:
            try:
                self._early_pong = self._call("Ping", gw.PingRequest())
            except Exception as e:  # raised by ping(), in the caller's thread
                self._early_pong = e

        self._early_ping = threading.Thread(target=ping, daemon=True, name="early-ping")
        self._early_ping.start()

    def _call(self, name: str, request, what: str = ""):
        try:
            answer = self.connection.call(SERVICE + name, request.SerializeToString())
        except CallError as e:
            raise GatewayError(f"{name}{' ' + what if what else ''}: {e.message}") from None
        return ANSWERS[name].FromString(answer)

    def ping(self) -> Caps:
        if self._early_ping is not None:
            self._early_ping.join()
            pong, self._early_ping, self._early_pong = self._early_pong, None, None
            if isinstance(pong, Exception):
                raise pong
        else:
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

    def warn(self, vertex: str, short: str, detail: list[str], url: str, info: pb.SourceInfo | None = None,
             lines: tuple[int, int] | None = None) -> None:
        """A warning shown with the build's progress (`gateway.warnings`, BuildKit >= v0.11), attached to
        VERTEX (an op digest of this build) and, with INFO, to LINES of that source."""
        req = gw.WarnRequest(digest=vertex, level=1, short=short.encode(), detail=[d.encode() for d in detail], url=url)
        if info is not None:
            req.info.CopyFrom(info)
        if lines is not None:
            rng = req.ranges.add()
            rng.start.line, rng.end.line = lines
        self._call("Warn", req, "warning")

    def return_result(self, result: gw.Result) -> None:
        self._call("Return", gw.ReturnRequest(result=result))

    def return_error(self, code: int, message: str) -> None:
        self._call("Return", gw.ReturnRequest(error=status_pb2.Status(code=code, message=message)))
