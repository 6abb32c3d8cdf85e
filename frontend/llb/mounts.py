"""The mounts of an exec op: one frozen dataclass per kind, each writing its pb.Mount and declaring the
caps it needs.

proto3 trap: `output` must be written as -1 for a mount without an output (0 would mean "output 0",
the root's); `input` -1 is an empty (scratch) source.
"""

from __future__ import annotations

from dataclasses import dataclass

from .proto import ops_pb2 as pb
from .state import Inputs, State


@dataclass(frozen=True)
class Bind:
    """A state (or the part of it under `selector`) at `dest`; `output` makes the mount's final
    contents an output of the op (`ExecState.mount_output`)."""

    dest: str
    source: State = State()
    selector: str = ""
    readonly: bool = False
    output: bool = False

    def marshal(self, inputs: Inputs, output: int, caps: set[str]) -> pb.Mount:
        mount = pb.Mount(input=inputs.index(self.source), dest=self.dest, output=output, readonly=self.readonly,
                         mountType=pb.BIND)
        if self.selector:
            mount.selector = self.selector
            caps.add("exec.mount.selector")
        if not self.readonly and output == -1:
            caps.add("exec.mount.bind.readwrite-nooutput")  # written to, then thrown away
        return mount


# Where `State.run` puts the root mount when the caller lists it (see State.run).
ROOT = Bind("/")

CACHE_SHARING = {"shared": pb.SHARED, "private": pb.PRIVATE, "locked": pb.LOCKED}


@dataclass(frozen=True)
class Cache:
    """A persistent cache directory `id`, shared between builds; it starts from `source` if given."""

    dest: str
    id: str
    sharing: str = "shared"
    source: State = State()
    selector: str = ""
    readonly: bool = False

    def __post_init__(self):
        if self.sharing not in CACHE_SHARING:
            raise ValueError(f"cache sharing {self.sharing!r}: want one of {', '.join(CACHE_SHARING)}")

    def marshal(self, inputs: Inputs, output: int, caps: set[str]) -> pb.Mount:
        caps.add("exec.mount.cache")
        mount = pb.Mount(input=inputs.index(self.source), dest=self.dest, output=-1, readonly=self.readonly,
                         mountType=pb.CACHE)
        mount.cacheOpt.ID = self.id
        if self.sharing != "shared":
            caps.add("exec.mount.cache.sharing")
        mount.cacheOpt.sharing = CACHE_SHARING[self.sharing]
        if self.selector:
            mount.selector = self.selector
            caps.add("exec.mount.selector")
        return mount


@dataclass(frozen=True)
class Tmpfs:
    dest: str
    size_bytes: int = 0  # 0: the daemon's default

    def marshal(self, inputs: Inputs, output: int, caps: set[str]) -> pb.Mount:
        caps.add("exec.mount.tmpfs")
        mount = pb.Mount(input=-1, dest=self.dest, output=-1, mountType=pb.TMPFS)
        if self.size_bytes:
            mount.TmpfsOpt.size = self.size_bytes
            caps.add("exec.mount.tmpfs.size")
        return mount


@dataclass(frozen=True)
class Secret:
    """The client's secret `id` as a read-only file."""

    dest: str
    id: str
    uid: int = 0
    gid: int = 0
    mode: int = 0o400
    optional: bool = True

    def marshal(self, inputs: Inputs, output: int, caps: set[str]) -> pb.Mount:
        caps.add("exec.mount.secret")
        return pb.Mount(input=-1, dest=self.dest, output=-1, readonly=True, mountType=pb.SECRET,
                        secretOpt=pb.SecretOpt(ID=self.id, uid=self.uid, gid=self.gid, mode=self.mode,
                                               optional=self.optional))


@dataclass(frozen=True)
class SSH:
    """The client's SSH agent `id` as a socket."""

    dest: str
    id: str = "default"
    uid: int = 0
    gid: int = 0
    mode: int = 0o600
    optional: bool = True

    def marshal(self, inputs: Inputs, output: int, caps: set[str]) -> pb.Mount:
        caps.add("exec.mount.ssh")
        return pb.Mount(input=-1, dest=self.dest, output=-1, readonly=True, mountType=pb.SSH,
                        SSHOpt=pb.SSHOpt(ID=self.id, uid=self.uid, gid=self.gid, mode=self.mode,
                                         optional=self.optional))


Mount = Bind | Cache | Tmpfs | Secret | SSH
