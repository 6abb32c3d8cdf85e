"""The LLB op graph: vertices, their inputs, and the Definition BuildKit solves.

A `Vertex` is one op (source, exec, file, merge) whose inputs are other vertices' outputs. Its digest
is sha256 of the exact bytes placed in the Definition (deterministic serialization, so the same graph
always gives the same digests and BuildKit's cache can recognise it). `definition(out)` writes every
vertex reachable from `out`, inputs first, then the terminal op that names the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .proto import ops_pb2 as pb


@dataclass(frozen=True)
class Output:
    """One filesystem result: output `index` of `vertex`."""

    vertex: "Vertex"
    index: int = 0


@dataclass(eq=False)
class Vertex:
    op: pb.Op  # without `inputs`: they are filled from `inputs` when marshalled
    inputs: list[Output] = field(default_factory=list)
    description: dict[str, str] = field(default_factory=dict)
    caps: set[str] = field(default_factory=set)
    ignore_cache: bool = False
    progress_group: tuple[str, str] | None = None
    _marshalled: tuple[str, bytes] | None = None

    def marshal(self) -> tuple[str, bytes]:
        """(digest, bytes) of this op with its inputs' digests."""
        if self._marshalled is None:
            op = pb.Op()
            op.CopyFrom(self.op)
            del op.inputs[:]
            for out in self.inputs:
                op.inputs.add(digest=out.vertex.marshal()[0], index=out.index)
            data = op.SerializeToString(deterministic=True)
            self._marshalled = ("sha256:" + hashlib.sha256(data).hexdigest(), data)
        return self._marshalled

    def metadata(self) -> pb.OpMetadata:
        md = pb.OpMetadata(ignore_cache=self.ignore_cache)
        for k, v in self.description.items():
            md.description[k] = v
        for cap in self.caps:
            md.caps[cap] = True
        if self.progress_group:
            md.progress_group.id, md.progress_group.name = self.progress_group
        return md


def definition(out: Output | None) -> pb.Definition:
    """Everything `out` needs, inputs first, then the terminal op. None (scratch) gives an empty
    Definition, which BuildKit solves to an empty result."""
    d = pb.Definition()
    if out is None:
        return d
    seen: dict[str, Vertex] = {}
    order: list[Vertex] = []

    def visit(v: Vertex) -> None:
        digest = v.marshal()[0]
        if digest in seen:
            return
        seen[digest] = v
        for i in v.inputs:
            visit(i.vertex)
        order.append(v)

    visit(out.vertex)
    caps: set[str] = {"constraints", "platform"}
    for v in order:
        digest, data = v.marshal()
        getattr(d, "def").append(data)
        md = v.metadata()
        # Two ops with identical bytes are one vertex: merge what each asked for.
        if digest in d.metadata:
            md.MergeFrom(d.metadata[digest])
        d.metadata[digest].CopyFrom(md)
        caps |= v.caps
        if v.description:
            caps.add("meta.description")
        if v.ignore_cache:
            caps.add("meta.ignorecache")
    terminal = pb.Op()
    terminal.inputs.add(digest=out.vertex.marshal()[0], index=out.index)
    data = terminal.SerializeToString(deterministic=True)
    getattr(d, "def").append(data)
    tmd = d.metadata["sha256:" + hashlib.sha256(data).hexdigest()]
    for cap in sorted(caps & {"constraints", "platform", "meta.description", "meta.ignorecache"}):
        tmd.caps[cap] = True
    return d


def platform(os_: str, arch: str, variant: str = "") -> pb.Platform:
    return pb.Platform(OS=os_, Architecture=arch, Variant=variant)


def source(identifier: str, attrs: dict[str, str] | None = None, *, plat: pb.Platform | None = None,
           caps: set[str] = frozenset(), description: dict[str, str] | None = None) -> Output:
    op = pb.Op(source=pb.SourceOp(identifier=identifier, attrs=attrs or {}))
    if plat is not None:
        op.platform.CopyFrom(plat)
    op.constraints.SetInParent()  # Go always writes an empty WorkerConstraints; same bytes, same vertex
    return Output(Vertex(op, [], dict(description or {}), set(caps)))


class InputList:
    """The inputs of one op being built: each distinct output once, addressed by its index."""

    def __init__(self):
        self.outputs: list[Output] = []

    def index(self, out: Output | None) -> int:
        if out is None:
            return -1
        key = (out.vertex.marshal()[0], out.index)
        for i, o in enumerate(self.outputs):
            if (o.vertex.marshal()[0], o.index) == key:
                return i
        self.outputs.append(out)
        return len(self.outputs) - 1


def from_definition(d: pb.Definition) -> Output | None:
    """A Definition someone else marshalled (a frontend input) as an output we can build on. Its ops
    keep their exact bytes and metadata, so their digests stay theirs."""
    ops = list(getattr(d, "def"))
    if not ops:
        return None
    vertices: dict[str, Vertex] = {}
    for data in ops[:-1]:
        op = pb.Op.FromString(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        inputs = [Output(vertices[i.digest], i.index) for i in op.inputs]
        v = Vertex(op, inputs)
        v._marshalled = (digest, data)
        if digest in d.metadata:
            md = d.metadata[digest]
            v.description, v.caps, v.ignore_cache = dict(md.description), {k for k, on in md.caps.items() if on}, md.ignore_cache
        vertices[digest] = v
    head = pb.Op.FromString(ops[-1]).inputs[0]
    return Output(vertices[head.digest], head.index)
