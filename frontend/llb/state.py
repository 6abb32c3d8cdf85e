"""The LLB graph: immutable states and the ops that make them.

A `State` is one filesystem: output `index` of an op, or scratch (no op). Ops are frozen dataclasses
whose inputs are other states; nothing is written until an op is marshalled, and then each op writes
its own bytes and declares, next to the field that needs it, the BuildKit capability it uses (so an op
can never use a feature without saying so in its OpMetadata).

An op's digest is sha256 of its exact bytes (`SerializeToString(deterministic=True)`), inputs by
digest: the same graph always gives the same digests, which is what BuildKit's cache keys on. The
byte layout here is the one this frontend has always written (inputs numbered in the order the op
meets them, empty WorkerConstraints as Go writes them), so existing caches keep hitting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Sequence

from .proto import ops_pb2 as pb

if TYPE_CHECKING:
    from .files import FileAction
    from .mounts import Mount

CUSTOM_NAME = "llb.customname"  # the line BuildKit's progress shows for the op
COMMAND = "com.docker.dockerfile.v1.command"  # the instruction, for BuildKit's history


@dataclass(frozen=True)
class Info:
    """What BuildKit shows and how it caches, beside an op's content (OpMetadata: not in its digest)."""

    name: str = ""
    command: str = ""
    ignore_cache: bool = False

    def description(self) -> dict[str, str]:
        desc = {}
        if self.name:
            desc[CUSTOM_NAME] = self.name
        if self.command:
            desc[COMMAND] = self.command
        return desc


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def of(cls, p: "Platform | pb.Platform | None") -> "Platform | None":
        if p is None or isinstance(p, Platform):
            return p
        return cls(p.OS, p.Architecture, p.Variant)

    def to_pb(self) -> pb.Platform:
        return pb.Platform(OS=self.os, Architecture=self.architecture, Variant=self.variant)


@dataclass(frozen=True)
class State:
    """A filesystem: output `index` of `op`; `op` None is scratch (the empty filesystem)."""

    op: "Op | None" = None
    index: int = 0

    @property
    def is_scratch(self) -> bool:
        return self.op is None

    def key(self) -> tuple[str, int] | None:
        """What makes two states the same input: the op's digest and the output."""
        return None if self.op is None else (self.op.digest, self.index)

    def run(self, args: Sequence[str], *, env: Sequence[str] = (), cwd: str = "/", user: str = "",
            mounts: Sequence["Mount"] = (), network: str = "sandbox", insecure: bool = False,
            proxy_env: "ProxyEnv | None" = None, extra_hosts: Sequence[tuple[str, str]] = (),
            remove_mount_stubs: bool = False, platform: Platform | pb.Platform | None = None,
            info: Info = Info()) -> "ExecState":
        """Run `args` with this state as `/`. The root mount comes first unless `mounts` lists `ROOT`
        where it belongs: inputs and outputs are numbered in the order the mounts are listed."""
        from .mounts import ROOT, Bind  # mounts.py builds on this module (its mounts hold states)

        root = Bind("/", self, output=True)
        listed = list(mounts) if any(m is ROOT for m in mounts) else [ROOT, *mounts]
        op = Exec(info=info, args=tuple(args), env=tuple(env), cwd=cwd, user=user,
                  mounts=tuple(root if m is ROOT else m for m in listed), network=network, insecure=insecure,
                  proxy_env=proxy_env, extra_hosts=tuple(extra_hosts), remove_mount_stubs=remove_mount_stubs,
                  platform=Platform.of(platform))
        return ExecState(op)

    def file(self, *actions: "FileAction", info: Info = Info()) -> "State":
        """One FileOp on this state: each action works on the result of the one before."""
        if not actions:
            raise ValueError("a file op needs at least one action")
        return State(File(info=info, base=self, actions=tuple(actions)))


@dataclass(frozen=True)
class ExecState:
    """The result of `State.run`: the new root, and any mount given an output."""

    op: "Exec"

    def root(self) -> State:
        return self.mount_output("/")

    def mount_output(self, dest: str) -> State:
        for index, mount in enumerate(self.op.outputs()):
            if mount.dest == dest:
                return State(self.op, index)
        raise KeyError(f"no mount with an output at {dest!r}")


def scratch() -> State:
    return State()


class Inputs:
    """The inputs of one op as it is marshalled: each distinct state once, numbered as first met."""

    def __init__(self):
        self.states: list[State] = []
        self._keys: list[tuple[str, int]] = []

    def index(self, state: State) -> int:
        key = state.key()
        if key is None:
            return -1  # scratch is no input
        if key not in self._keys:
            self._keys.append(key)
            self.states.append(state)
        return self._keys.index(key)


@dataclass(frozen=True, eq=False)
class Op(ABC):
    """One vertex. Subclasses write their content in `build` and declare the caps it uses there."""

    info: Info = Info()

    @abstractmethod
    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        """Write this op's fields into a pb.Op, its inputs into INPUTS, and the caps it uses into CAPS."""

    @cached_property
    def _marshalled(self) -> tuple[str, bytes, tuple[State, ...], frozenset[str]]:
        inputs, caps = Inputs(), set()
        op = self.build(inputs, caps)
        for state in inputs.states:
            op.inputs.add(digest=state.op.digest, index=state.index)
        op.constraints.SetInParent()  # Go always writes an empty WorkerConstraints; same bytes, same vertex
        data = op.SerializeToString(deterministic=True)
        return "sha256:" + hashlib.sha256(data).hexdigest(), data, tuple(inputs.states), frozenset(caps)

    @property
    def digest(self) -> str:
        return self._marshalled[0]

    @property
    def data(self) -> bytes:
        return self._marshalled[1]

    @property
    def inputs(self) -> tuple[State, ...]:
        return self._marshalled[2]

    @property
    def caps(self) -> frozenset[str]:
        return self._marshalled[3]

    def metadata(self) -> pb.OpMetadata:
        md = pb.OpMetadata(ignore_cache=self.info.ignore_cache, description=self.info.description())
        for cap in self.caps:
            md.caps[cap] = True
        return md


# What each source attribute needs of the daemon; the scheme's own cap comes with the identifier.
SOURCE_SCHEME_CAPS = {"docker-image": "source.image", "local": "source.local", "git": "source.git",
                      "http": "source.http", "https": "source.http"}
SOURCE_ATTR_CAPS = {
    "image.resolvemode": "source.image.resolvemode",
    "local.session": "source.local.sessionid", "local.sharedkeyhint": "source.local.sharedkeyhint",
    "local.excludepatterns": "source.local.excludepatterns", "local.followpaths": "source.local.followpaths",
    "local.includepatterns": "source.local.includepatterns",
    "git.fullurl": "source.git.fullurl", "git.keepgitdir": "source.git.keepgitdir",
    "http.checksum": "source.http.checksum",
}


@dataclass(frozen=True, eq=False)
class Source(Op):
    identifier: str = ""
    attrs: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        op = pb.Op(source=pb.SourceOp(identifier=self.identifier, attrs=dict(self.attrs)))
        if self.platform is not None:
            op.platform.CopyFrom(self.platform.to_pb())
        scheme, _, rest = self.identifier.partition("://")
        caps.add(SOURCE_SCHEME_CAPS[scheme])
        caps.update(SOURCE_ATTR_CAPS[k] for k, _ in self.attrs if k in SOURCE_ATTR_CAPS)
        if scheme == "git" and ":" in rest.partition("#")[2]:
            caps.add("source.git.subdir")  # #ref:dir
        return op


@dataclass(frozen=True)
class ProxyEnv:
    http_proxy: str = ""
    https_proxy: str = ""
    ftp_proxy: str = ""
    no_proxy: str = ""
    all_proxy: str = ""


NETWORK_MODES = {"sandbox": pb.UNSET, "host": pb.HOST, "none": pb.NONE}


@dataclass(frozen=True, eq=False)
class Exec(Op):
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: str = ""
    mounts: tuple["Mount", ...] = ()  # in input order; written sorted by destination
    network: str = "sandbox"
    insecure: bool = False
    proxy_env: ProxyEnv | None = None
    extra_hosts: tuple[tuple[str, str], ...] = ()
    remove_mount_stubs: bool = False  # BuildKit >= v0.11 then removes the mount points it made, nested too
    platform: Platform | None = None

    def __post_init__(self):
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network mode {self.network!r}: want one of {', '.join(NETWORK_MODES)}")

    def outputs(self) -> list["Mount"]:
        return [m for m in self.mounts if getattr(m, "output", False)]

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        caps.update(("exec.meta.base", "exec.mount.bind"))  # the root is a bind mount, even of scratch
        meta = pb.Meta(args=self.args, env=self.env, cwd=self.cwd, user=self.user)
        if self.proxy_env is not None:
            meta.proxy_env.SetInParent()
            for name, value in vars(self.proxy_env).items():
                setattr(meta.proxy_env, name, value)
            caps.add("exec.meta.proxyenv")
        for host, ip in self.extra_hosts:
            meta.extraHosts.add(Host=host, IP=ip)
        if self.remove_mount_stubs:
            # No cap: BuildKit declares exec.meta.removemountstubs.recursive but never registers it, so a
            # daemon would refuse an op that lists it. Older daemons skip the unknown field.
            meta.removeMountStubsRecursive = True
        op = pb.Op(exec=pb.ExecOp(meta=meta))
        if self.platform is not None:
            op.platform.CopyFrom(self.platform.to_pb())
        if self.network != "sandbox":
            op.exec.network = NETWORK_MODES[self.network]
            caps.add("exec.meta.network")
        if self.insecure:
            op.exec.security = pb.INSECURE
            caps.add("exec.meta.security")
        outputs = {id(m): i for i, m in enumerate(self.outputs())}
        written = [m.marshal(inputs, outputs.get(id(m), -1), caps) for m in self.mounts]
        op.exec.mounts.extend(sorted(written, key=lambda m: m.dest))
        return op


@dataclass(frozen=True, eq=False)
class File(Op):
    base: State = State()
    actions: tuple["FileAction", ...] = ()

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        caps.add("file.base")
        base = inputs.index(self.base)
        secondary = [inputs.index(a.source) for a in self.actions]  # copies read a second state
        written = []
        for j, (action, second) in enumerate(zip(self.actions, secondary)):
            # Action j > 0 works on the result of action j-1, numbered past the op's inputs.
            own_input = base if j == 0 else len(inputs.states) + j - 1
            output = 0 if j == len(self.actions) - 1 else -1
            written.append(action.marshal(own_input, second, output, base, caps))
        return pb.Op(file=pb.FileOp(actions=written))


@dataclass(frozen=True, eq=False)
class Merge(Op):
    states: tuple[State, ...] = ()

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        caps.add("mergeop")
        return pb.Op(merge=pb.MergeOp(inputs=[pb.MergeInput(input=inputs.index(s)) for s in self.states]))


@dataclass(frozen=True, eq=False)
class Diff(Op):
    lower: State = State()
    upper: State = State()

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        caps.add("diffop")
        lower, upper = inputs.index(self.lower), inputs.index(self.upper)
        return pb.Op(diff=pb.DiffOp(lower=pb.LowerDiffInput(input=lower), upper=pb.UpperDiffInput(input=upper)))


@dataclass(frozen=True, eq=False)
class Marshalled(Op):
    """An op someone else marshalled (a frontend input): its bytes and metadata are kept as they are,
    so its digest stays theirs."""

    raw: bytes = b""
    raw_inputs: tuple[State, ...] = ()
    raw_metadata: bytes = b""

    def build(self, inputs: Inputs, caps: set[str]) -> pb.Op:
        """The op as its author wrote it, its inputs and caps declared as any op's (for a reader of the
        graph; the digest comes from the raw bytes, see _marshalled)."""
        for state in self.raw_inputs:
            inputs.index(state)
        caps.update(k for k, on in pb.OpMetadata.FromString(self.raw_metadata).caps.items() if on)
        op = pb.Op.FromString(self.raw)
        del op.inputs[:]
        return op

    @cached_property
    def _marshalled(self) -> tuple[str, bytes, tuple[State, ...], frozenset[str]]:
        md = pb.OpMetadata.FromString(self.raw_metadata)
        caps = frozenset(k for k, on in md.caps.items() if on)
        return "sha256:" + hashlib.sha256(self.raw).hexdigest(), self.raw, self.raw_inputs, caps

    def metadata(self) -> pb.OpMetadata:
        return pb.OpMetadata.FromString(self.raw_metadata)


def merge(states: Iterable[State], info: Info = Info()) -> State:
    """The states layered in order (later wins); scratch adds nothing. Needs the `mergeop` cap."""
    layers = tuple(s for s in states if not s.is_scratch)
    if not layers:
        return scratch()
    return State(Merge(info=info, states=layers))


def diff(lower: State, upper: State, info: Info = Info()) -> State:
    """What `upper` changes on top of `lower`. Needs the `diffop` cap."""
    return State(Diff(info=info, lower=lower, upper=upper))
