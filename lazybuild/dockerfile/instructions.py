"""Parsed nodes -> typed instructions with their flags validated, as BuildKit's instructions package does.

One frozen dataclass per instruction. Each keeps its arguments *unexpanded*: expansion depends on the
ARG/ENV scope at that point of its stage, which the model (model.py) tracks and which gives back an
expanded copy of the same class. Errors name the Dockerfile line and say what was expected, in
BuildKit's words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .parser import DockerfileError, Node, Result

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9\-_.]*$")

# flag kinds: "string" (one value), "bool" (--x or --x=true|false), "strings" (repeatable)
FLAGS: dict[str, dict[str, str]] = {
    "from": {"platform": "string"},
    "run": {"mount": "strings", "network": "string", "security": "string"},
    "copy": {"from": "string", "chown": "string", "chmod": "string", "link": "bool", "exclude": "strings",
             "parents": "bool"},
    "add": {"chown": "string", "chmod": "string", "link": "bool", "keep-git-dir": "bool", "checksum": "string",
            "unpack": "bool", "exclude": "strings"},
    "healthcheck": {"interval": "string", "timeout": "string", "start-period": "string", "start-interval": "string",
                    "retries": "string"},
}
MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
NETWORK_MODES = ("default", "none", "host")
SECURITY_MODES = ("sandbox", "insecure")
SHARING_MODES = ("shared", "private", "locked")


class InstructionError(DockerfileError):
    pass


# ---- the parts instructions are made of


@dataclass(frozen=True)
class Heredoc:
    """A `<<NAME` document as written: `chomp` for `<<-` (leading tabs go), `expand` unless the name is quoted."""

    name: str
    data: str
    chomp: bool = False
    expand: bool = True

    def to_json(self) -> dict:
        return {"name": self.name, "data": self.data, "chomp": self.chomp, "expand": self.expand}


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str

    def to_json(self) -> dict:
        return {"key": self.key, "value": self.value}


@dataclass(frozen=True)
class ArgDecl:
    """One name of an ARG line. Parsed: `value` is the default as written. In a stage: the value in effect."""

    key: str
    value: str | None

    def to_json(self) -> dict:
        return {"key": self.key, "value": self.value}


@dataclass(frozen=True)
class Command:
    """CMD, ENTRYPOINT or RUN arguments: the exec form's argv, or the shell form's one command line."""

    exec_form: bool
    words: tuple[str, ...]  # the argv (exec form) or one string (shell form)

    def argv(self, shell: tuple[str, ...]) -> tuple[str, ...]:
        return self.words if self.exec_form else tuple(shell) + self.words


@dataclass(frozen=True)
class MountSpec:
    """One `RUN --mount=` as written, with the defaults BuildKit's parser gives it (runmount.go); the
    rest (relative targets, owners and modes) is filled when the RUN becomes a step (steps.py)."""

    type: str
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    id: str | None = None
    env: str | None = None
    sharing: str | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: str | None = None
    readonly: bool | None = None
    required: bool | None = None
    from_stage: int | None = None  # set by the model when `from` names an earlier stage
    # The options in the order they were written, then the defaults the parser added: inspect-dockerfile
    # prints them in this order.
    written_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> dict:
        values = {"type": self.type, "from": self.from_, "source": self.source, "target": self.target,
                  "id": self.id, "env": self.env, "sharing": self.sharing, "mode": self.mode, "uid": self.uid,
                  "gid": self.gid, "size": self.size, "required": self.required, "readonly": self.readonly,
                  "fromStage": self.from_stage}
        keys = ["type", *self.written_order] + [k for k in values if k != "type" and k not in self.written_order]
        return {k: values[k] for k in keys if values[k] is not None}


# ---- the instructions


@dataclass(frozen=True, kw_only=True)
class Instruction:
    line: int
    end_line: int
    original: str  # the instruction as written (flags and all)
    comments: tuple[str, ...] = ()  # the comment lines right above it (a stage's or an ARG's description)

    @property
    def keyword(self) -> str:
        """The instruction's name, upper-case, as BuildKit prints it."""
        return type(self).__name__.upper()

    @property
    def text(self) -> str:
        """The instruction on one line, for progress names and errors."""
        return " ".join(self.original.split())


@dataclass(frozen=True, kw_only=True)
class From(Instruction):
    image: str
    name: str  # lower-case stage name, "" when unnamed
    platform: str


@dataclass(frozen=True, kw_only=True)
class Arg(Instruction):
    args: tuple[ArgDecl, ...]


@dataclass(frozen=True, kw_only=True)
class Env(Instruction):
    pairs: tuple[KeyValue, ...]


@dataclass(frozen=True, kw_only=True)
class Label(Instruction):
    pairs: tuple[KeyValue, ...]


@dataclass(frozen=True, kw_only=True)
class Run(Instruction):
    command: Command
    mounts: tuple[MountSpec, ...]
    network: str | None  # None when not written
    security: str | None
    heredocs: tuple[Heredoc, ...]  # as written: the shell (or the step) interprets them


@dataclass(frozen=True, kw_only=True)
class Cmd(Instruction):
    command: Command


@dataclass(frozen=True, kw_only=True)
class Entrypoint(Instruction):
    command: Command


@dataclass(frozen=True, kw_only=True)
class Shell(Instruction):
    shell: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class FileCopy(Instruction):
    """What COPY and ADD share. Flags hold None when not written."""

    sources: tuple[str, ...]
    dest: str
    heredocs: tuple[Heredoc, ...]  # in a stage: expanded and chomped, ready to be written
    chown: str | None = None
    chmod: str | None = None
    link: bool | None = None
    exclude: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Copy(FileCopy):
    from_: str | None = None  # an earlier stage, a named context or an image
    from_stage: int | None = None  # set by the model when `from_` names an earlier stage
    parents: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Add(FileCopy):
    keep_git_dir: bool | None = None
    checksum: str | None = None
    unpack: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Workdir(Instruction):
    path: str  # in a stage: absolute


@dataclass(frozen=True, kw_only=True)
class User(Instruction):
    user: str


@dataclass(frozen=True, kw_only=True)
class StopSignal(Instruction):
    signal: str


@dataclass(frozen=True, kw_only=True)
class Maintainer(Instruction):
    maintainer: str


@dataclass(frozen=True, kw_only=True)
class Expose(Instruction):
    ports: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Volume(Instruction):
    paths: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Healthcheck(Instruction):
    test: tuple[str, ...]  # ("NONE",) | ("CMD", argv...) | ("CMD-SHELL", command)
    interval_s: float | None = None
    timeout_s: float | None = None
    start_period_s: float | None = None
    start_interval_s: float | None = None
    retries: int | None = None

    def to_config(self) -> dict:
        """The image config's Healthcheck (durations in nanoseconds)."""
        out: dict = {"Test": list(self.test)}
        for seconds, key in ((self.interval_s, "Interval"), (self.timeout_s, "Timeout"),
                             (self.start_period_s, "StartPeriod"), (self.start_interval_s, "StartInterval")):
            if seconds is not None:
                out[key] = int(seconds * 1e9)
        if self.retries is not None:
            out["Retries"] = self.retries
        return out


@dataclass(frozen=True, kw_only=True)
class Onbuild(Instruction):
    trigger: str  # the instruction text, run when a later build starts from this image


StepInstruction = Run | Copy | Add | Workdir


# ---- flags and mounts


def parse_flags(kind: str, raw: list[str]) -> dict:
    """`--name=value` words -> {name: value}, refusing unknown, repeated or valueless flags."""
    allowed = FLAGS.get(kind, {})
    out: dict = {}
    for word in raw:
        if not word.startswith("--"):
            raise ValueError(f"arg should start with -- : {word}")
        name, has_value, value = word[2:].partition("=")
        what = allowed.get(name)
        if what is None:
            raise ValueError(f"unknown flag: {name}")
        if name in out and what != "strings":
            raise ValueError(f"duplicate flag specified: {name}")
        if what == "bool":
            if has_value and value.lower() not in ("true", "false"):
                raise ValueError(f"expecting boolean value for flag {name}, not: {value}")
            out[name] = not has_value or value.lower() == "true"
        elif not has_value:
            raise ValueError(f"missing a value on flag: {name}")
        elif what == "strings":
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def parse_duration_s(text: str, flag: str) -> float:
    """Go duration strings (`30s`, `1m30s`, `500ms`) -> seconds."""
    if text in ("", "0"):
        return 0.0
    if not _DURATION.match(text):
        raise ValueError(f"time: invalid duration {text!r} for --{flag}")
    return sum(float(n) * _UNITS_S[u] for n, u in _DURATION_PART.findall(text))


def parse_mount(spec: str) -> MountSpec:
    """One `RUN --mount=` value (CSV of key=value) -> a MountSpec, validated like BuildKit's runmount."""
    fields: dict = {"type": "bind"}  # keyed by the names inspect-dockerfile prints
    for field_ in _csv(spec):
        key, has_value, value = field_.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if key in ("readonly", "ro", "readwrite", "rw", "required"):
            if has_value and value.lower() not in ("true", "false"):
                raise ValueError(f"invalid value for {key}: {value}")
            flag = not has_value or value.lower() == "true"
            if key in ("readonly", "ro"):
                fields["readonly"] = flag
            elif key in ("readwrite", "rw"):
                fields["readonly"] = not flag
            else:
                fields["required"] = flag
            continue
        if not has_value:
            raise ValueError(f"invalid field '{field_}' must be a key=value pair")
        if key == "type":
            if value not in MOUNT_TYPES:
                raise ValueError(f"unsupported mount type {value!r} (want one of {', '.join(MOUNT_TYPES)})")
            fields["type"] = value
        elif key in ("target", "dst", "destination"):
            fields["target"] = value
        elif key in ("source", "src"):
            fields["source"] = value
        elif key == "from":
            fields["from"] = value
        elif key in ("id", "env"):
            fields[key] = value
        elif key == "sharing":
            if value not in SHARING_MODES:
                raise ValueError(f"unsupported sharing value {value!r} (want shared, private or locked)")
            fields["sharing"] = value
        elif key == "mode":
            try:
                fields["mode"] = int(value, 8)
            except ValueError:
                raise ValueError(f"invalid mode {value!r}: want octal (e.g. 0755)") from None
        elif key in ("uid", "gid"):
            if not value.isdigit():
                raise ValueError(f"invalid {key} {value!r}: want a number")
            fields[key] = int(value)
        elif key == "size":
            fields["size"] = value
        else:
            raise ValueError(f"unexpected key '{key}' in '{field_}'")
    kind = fields["type"]
    if kind in ("bind", "cache", "tmpfs") and "target" not in fields:
        raise ValueError(f"mount type {kind} requires a target (target=/path)")
    if kind == "secret":
        if "target" not in fields and "id" not in fields and "env" not in fields:
            raise ValueError("secret mount requires an id or a target")
        if "id" not in fields and "target" in fields:
            fields["id"] = fields["target"].rstrip("/").rsplit("/", 1)[-1]  # BuildKit: the target's base name
        if "target" not in fields and "env" not in fields:
            fields["target"] = "/run/secrets/" + fields["id"]
    if kind == "ssh":
        fields.setdefault("id", "default")
        fields.setdefault("target", "/run/buildkit/ssh_agent.0")
    if kind in ("bind", "cache") and "readonly" not in fields:
        fields["readonly"] = kind == "bind"
    if "sharing" in fields and kind != "cache":
        raise ValueError("sharing is only allowed for cache mounts")
    if kind == "cache" and "sharing" not in fields:
        fields["sharing"] = "shared"
    return MountSpec(**{("from_" if k == "from" else k): v for k, v in fields.items()},
                     written_order=tuple(k for k in fields if k != "type"))


def _csv(text: str) -> list[str]:
    """Split on commas outside double quotes (mount specs may quote paths)."""
    out, cur, quote = [], [], False
    for ch in text:
        if ch == '"':
            quote = not quote
            continue
        if ch == "," and not quote:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [x for x in out if x.strip()]


# ---- nodes -> instructions


def from_node(node: Node, filename: str = "Dockerfile") -> Instruction:
    kind = node.value.lower()
    where = {"line": node.start_line, "end_line": node.end_line, "original": node.original,
             "comments": tuple(node.prev_comment)}
    try:
        flags = parse_flags(kind, node.flags)
        return _instruction(kind, node, flags, where)
    except ValueError as e:
        raise InstructionError(str(e), node.start_line, node.end_line, filename) from None


def _command(node: Node, args: list[str]) -> Command:
    if node.attributes.get("json"):
        return Command(True, tuple(args))
    return Command(False, (" ".join(args),))


def _heredocs(node: Node) -> tuple[Heredoc, ...]:
    return tuple(Heredoc(h.name, h.content, h.chomp, h.expand) for h in node.heredocs)


def _one_value(kind: str, args: list[str]) -> str:
    if len(args) != 1 or not args[0]:
        raise ValueError(f"{kind.upper()} requires exactly one argument")
    return args[0]


def _instruction(kind: str, node: Node, flags: dict, where: dict) -> Instruction:
    args = node.tokens()
    n = len(args)
    match kind:
        case "from":
            if n not in (1, 3) or (n == 3 and args[1].lower() != "as"):
                raise ValueError("FROM requires either one or three arguments")
            name = args[2].lower() if n == 3 else ""
            if name and not _STAGE_NAME.match(name):
                raise ValueError(f'invalid name for build stage: "{args[2]}", name can\'t start with a number or '
                                 'contain symbols')
            return From(image=args[0], name=name, platform=flags.get("platform", ""), **where)
        case "arg":
            if not args:
                raise ValueError("ARG requires at least one argument")
            decls = []
            for w in args:
                key, has_value, value = w.partition("=")
                if not key:
                    raise ValueError("ARG names can not be blank")
                decls.append(ArgDecl(key, value if has_value else None))
            return Arg(args=tuple(decls), **where)
        case "env" | "label":
            if not args:
                raise ValueError(f"{kind.upper()} requires at least one argument")
            if n % 3:
                raise ValueError(f"Bad input to {kind.upper()}, too many arguments")
            pairs = []
            for i in range(0, n, 3):
                if not args[i]:
                    raise ValueError(f"{kind.upper()} names can not be blank")
                pairs.append(KeyValue(args[i], args[i + 1]))
            return (Env if kind == "env" else Label)(pairs=tuple(pairs), **where)
        case "run":
            mounts = tuple(parse_mount(m) for m in flags.get("mount", []))
            if "network" in flags and flags["network"] not in NETWORK_MODES:
                raise ValueError(f"unsupported network mode {flags['network']!r} (want default, none or host)")
            if "security" in flags and flags["security"] not in SECURITY_MODES:
                raise ValueError(f"unsupported security mode {flags['security']!r} (want sandbox or insecure)")
            if not args and not node.heredocs:
                raise ValueError("RUN requires at least one argument")
            return Run(command=_command(node, args), mounts=mounts, network=flags.get("network"),
                       security=flags.get("security"), heredocs=_heredocs(node), **where)
        case "cmd":
            return Cmd(command=_command(node, args), **where)
        case "entrypoint":
            return Entrypoint(command=_command(node, args), **where)
        case "shell":
            if not node.attributes.get("json"):
                raise ValueError("SHELL requires the arguments to be in JSON form")
            if not args:
                raise ValueError("SHELL requires at least one argument")
            return Shell(shell=tuple(args), **where)
        case "copy" | "add":
            return _file_copy(kind, node, args, flags, where)
        case "workdir":
            return Workdir(path=_one_value(kind, args), **where)
        case "user":
            return User(user=_one_value(kind, args), **where)
        case "stopsignal":
            return StopSignal(signal=_one_value(kind, args), **where)
        case "maintainer":
            return Maintainer(maintainer=_one_value(kind, args), **where)
        case "expose":
            if not args:
                raise ValueError("EXPOSE requires at least one argument")
            return Expose(ports=tuple(args), **where)
        case "volume":
            if not args:
                raise ValueError("VOLUME requires at least one argument")
            if any(not v.strip() for v in args):
                raise ValueError("VOLUME specified can not be an empty string")
            return Volume(paths=tuple(args), **where)
        case "healthcheck":
            return _healthcheck(node, args, flags, where)
        case "onbuild":
            if node.next is None or not node.next.children:
                raise ValueError("ONBUILD requires at least one argument")
            what = node.next.children[0].value.upper()
            if what == "ONBUILD":
                raise ValueError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
            if what in ("FROM", "MAINTAINER"):
                raise ValueError(f"{what} isn't allowed as an ONBUILD trigger")
            return Onbuild(trigger=node.original.strip()[len(node.value):].strip(), **where)
    raise ValueError(f"unknown instruction: {node.value.upper()}")


def _file_copy(kind: str, node: Node, args: list[str], flags: dict, where: dict) -> FileCopy:
    heredocs = _heredocs(node)
    names = {h.name for h in heredocs}
    if len(args) < 2 and not (len(args) == 1 and names):
        raise ValueError(f"{kind.upper()} requires at least two arguments, but only one was provided. "
                         "Destination could not be determined")
    # `<<NAME` words are the heredocs themselves, not files of the context.
    sources = tuple(s for s in args[:-1] if not (s.startswith("<<") and s.lstrip("<-").strip("'\"") in names))
    common = dict(sources=sources, dest=args[-1], heredocs=heredocs, chown=flags.get("chown"),
                  chmod=flags.get("chmod"), link=flags.get("link"),
                  exclude=tuple(flags["exclude"]) if "exclude" in flags else None, **where)
    if kind == "copy":
        return Copy(from_=flags.get("from"), parents=flags.get("parents"), **common)
    return Add(keep_git_dir=flags.get("keep-git-dir"), checksum=flags.get("checksum"), unpack=flags.get("unpack"),
               **common)


def _healthcheck(node: Node, args: list[str], flags: dict, where: dict) -> Healthcheck:
    if not args:
        raise ValueError("HEALTHCHECK requires at least one argument")
    typ = args[0].upper()
    if typ == "NONE":
        if len(args) > 1 or flags:
            raise ValueError("HEALTHCHECK NONE takes no arguments")
        return Healthcheck(test=("NONE",), **where)
    if typ != "CMD":
        raise ValueError(f'Unknown type "{args[0]}" in HEALTHCHECK (try CMD)')
    rest = args[1:]
    if not rest:
        raise ValueError("Missing command after HEALTHCHECK CMD")
    test = ("CMD", *rest) if node.attributes.get("json") else ("CMD-SHELL", " ".join(rest))
    durations: dict[str, float] = {}
    for flag in ("interval", "timeout", "start-period", "start-interval"):
        if flag in flags:
            seconds = parse_duration_s(flags[flag], flag)
            if 0 < seconds < 0.001:
                raise ValueError(f'Interval "{flag}" cannot be less than 1ms')
            durations[flag.replace("-", "_") + "_s"] = seconds
    retries = None
    if "retries" in flags:
        try:
            retries = int(flags["retries"])
        except ValueError:
            raise ValueError(f"--retries expects an integer, not {flags['retries']!r}") from None
        if retries < 0:
            raise ValueError(f"--retries cannot be negative ({retries})")
    return Healthcheck(test=test, retries=retries, **durations, **where)


def instructions(result: Result, filename: str = "Dockerfile") -> list[Instruction]:
    return [from_node(child, filename) for child in result.ast.children]
