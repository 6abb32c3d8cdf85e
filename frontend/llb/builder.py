"""The LLB builder, in the spirit of BuildKit's client/llb: source constructors, immutable states and
one `definition()` that marshals a graph.

    base = image("docker.io/library/alpine:latest", platform=amd64)
    built = base.run(["sh", "-c", "make"], mounts=[Cache("/root/.cache", id="/root/.cache")]).root()
    done = built.file(Mkdir("/out", make_parents=True), Copy(context, "/a", "/out/"))
    definition(done)  # every op reachable from `done`, inputs first, then the terminal op

States never change: `run`, `file`, `merge` and `diff` return new ones, so a state can be shared by
any number of later steps. Ops declare their caps themselves (see state.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from .files import Chown, Copy, FileAction, Mkdir, Mkfile, Rm
from .mounts import ROOT, SSH, Bind, Cache, Mount, Secret, Tmpfs
from .proto import ops_pb2 as pb
from .state import (COMMAND, CUSTOM_NAME, Exec, ExecState, Info, Marshalled, Op, Platform, ProxyEnv, Source,
                    State, diff, merge, scratch)

__all__ = [
    "COMMAND", "CUSTOM_NAME", "Bind", "Cache", "Chown", "Copy", "Exec", "ExecState", "FileAction", "Info",
    "Mkdir", "Mkfile", "Mount", "Platform", "ProxyEnv", "ROOT", "Rm", "SSH", "Secret", "State", "Tmpfs",
    "definition", "diff", "from_definition", "git", "http", "image", "local", "merge", "scratch", "source",
]


# ---- sources
def source(identifier: str, attrs: dict[str, str] | None = None, *, platform: Platform | pb.Platform | None = None,
           info: Info = Info()) -> State:
    """Any source op; the constructors below name the attributes of each kind."""
    return State(Source(info=info, identifier=identifier, attrs=tuple(sorted((attrs or {}).items())),
                        platform=Platform.of(platform)))


def image(name: str, *, platform: Platform | pb.Platform | None = None, resolve_mode: str = "default",
          info: Info = Info()) -> State:
    """A registry image, by its full name (`docker.io/library/alpine:latest`)."""
    attrs = {} if resolve_mode == "default" else {"image.resolvemode": resolve_mode}
    return source("docker-image://" + name, attrs, platform=platform, info=info)


def local(name: str, *, session_id: str, shared_key_hint: str, follow_paths: Sequence[str] | None = None,
          exclude_patterns: Sequence[str] = (), info: Info = Info()) -> State:
    """Files of the client's local directory `name`; `follow_paths` limits what is sent (None: all)."""
    attrs = {"local.session": session_id, "local.sharedkeyhint": shared_key_hint}
    if exclude_patterns:
        attrs["local.excludepatterns"] = json.dumps(list(exclude_patterns))
    if follow_paths is not None:
        attrs["local.followpaths"] = json.dumps(list(follow_paths))
    return source("local://" + name, attrs, info=info)


def git(remote: str, ref: str = "", *, full_url: str, keep_git_dir: bool = False, info: Info = Info()) -> State:
    """A git repository: `remote` is the identifier's host/path, `ref` the `#ref[:subdir]` fragment,
    `full_url` what is actually fetched."""
    attrs = {"git.fullurl": full_url}
    if keep_git_dir:
        attrs["git.keepgitdir"] = "true"
    return source("git://" + remote + (f"#{ref}" if ref else ""), attrs, info=info)


def http(url: str, *, filename: str, checksum: str = "", info: Info = Info()) -> State:
    """One file downloaded from `url`, named `filename` in the state."""
    attrs = {"http.filename": filename}
    if checksum:
        attrs["http.checksum"] = checksum
    return source(url, attrs, info=info)


# ---- the Definition
# Caps of the Definition as a whole, declared on the terminal op (as BuildKit's Marshal does).
TERMINAL_CAPS = ("constraints", "platform")


def definition(state: State) -> pb.Definition:
    """Everything `state` needs, inputs first, then the terminal op naming the result. Scratch gives an
    empty Definition, which BuildKit solves to an empty result. Ops with identical bytes are one vertex;
    their metadata is merged (caps and descriptions together, ignore_cache if any asked)."""
    d = pb.Definition()
    if state.is_scratch:
        return d
    visited: set[int] = set()
    order: list[Op] = []

    def visit(op: Op) -> None:
        if id(op) in visited:
            return
        visited.add(id(op))
        for inp in op.inputs:
            visit(inp.op)
        if op.digest not in d.metadata:
            order.append(op)
            d.metadata[op.digest].CopyFrom(op.metadata())
        else:
            d.metadata[op.digest].MergeFrom(op.metadata())

    visit(state.op)
    getattr(d, "def").extend(op.data for op in order)
    terminal = pb.Op()
    terminal.inputs.add(digest=state.op.digest, index=state.index)
    data = terminal.SerializeToString(deterministic=True)
    getattr(d, "def").append(data)
    caps = set(TERMINAL_CAPS)
    if any(md.description for md in d.metadata.values()):
        caps.add("meta.description")
    if any(md.ignore_cache for md in d.metadata.values()):
        caps.add("meta.ignorecache")
    tmd = d.metadata["sha256:" + hashlib.sha256(data).hexdigest()]
    for cap in sorted(caps):
        tmd.caps[cap] = True
    return d


def from_definition(d: pb.Definition) -> State:
    """A Definition someone else marshalled (a frontend input) as a state to build on. Its ops keep
    their exact bytes and metadata, so their digests stay theirs."""
    ops = list(getattr(d, "def"))
    if not ops:
        return scratch()
    marshalled: dict[str, Marshalled] = {}
    for data in ops[:-1]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        inputs = tuple(State(marshalled[i.digest], i.index) for i in pb.Op.FromString(data).inputs)
        md = d.metadata[digest].SerializeToString(deterministic=True) if digest in d.metadata else b""
        marshalled[digest] = Marshalled(raw=data, raw_inputs=inputs, raw_metadata=md)
    head = pb.Op.FromString(ops[-1]).inputs[0]
    return State(marshalled[head.digest], head.index)
