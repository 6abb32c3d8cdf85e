"""Parsed nodes -> typed instructions with their flags validated, as BuildKit's instructions package does.

Each instruction keeps its arguments *unexpanded*: expansion depends on the ARG/ENV scope at that point
of its stage, which the model (model.py) tracks. Errors name the Dockerfile line and say what was
expected, in BuildKit's words.
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


@dataclass
class Instruction:
    kind: str  # lower-case instruction name
    line: int
    end_line: int
    original: str
    flags: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)  # what this kind holds (args, sources, kvps, ...)
    heredocs: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"instruction": self.kind.upper(), "line": self.line, "flags": self.flags, **self.spec}


class InstructionError(DockerfileError):
    pass


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


def parse_mount(spec: str) -> dict:
    """One `RUN --mount=` value (CSV of key=value) -> a mount dict, validated like BuildKit's runmount."""
    m: dict = {"type": "bind"}
    for field_ in _csv(spec):
        key, has_value, value = field_.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if key in ("readonly", "ro", "readwrite", "rw", "required"):
            if has_value and value.lower() not in ("true", "false"):
                raise ValueError(f"invalid value for {key}: {value}")
            flag = not has_value or value.lower() == "true"
            if key in ("readonly", "ro"):
                m["readonly"] = flag
            elif key in ("readwrite", "rw"):
                m["readonly"] = not flag
            else:
                m["required"] = flag
            continue
        if not has_value:
            raise ValueError(f"invalid field '{field_}' must be a key=value pair")
        if key == "type":
            if value not in MOUNT_TYPES:
                raise ValueError(f"unsupported mount type {value!r} (want one of {', '.join(MOUNT_TYPES)})")
            m["type"] = value
        elif key in ("target", "dst", "destination"):
            m["target"] = value
        elif key in ("source", "src"):
            m["source"] = value
        elif key in ("from", "id", "env"):
            m[key] = value
        elif key == "sharing":
            if value not in ("shared", "private", "locked"):
                raise ValueError(f"unsupported sharing value {value!r} (want shared, private or locked)")
            m["sharing"] = value
        elif key == "mode":
            try:
                m["mode"] = int(value, 8)
            except ValueError:
                raise ValueError(f"invalid mode {value!r}: want octal (e.g. 0755)") from None
        elif key in ("uid", "gid"):
            if not value.isdigit():
                raise ValueError(f"invalid {key} {value!r}: want a number")
            m[key] = int(value)
        elif key == "size":
            m["size"] = value
        else:
            raise ValueError(f"unexpected key '{key}' in '{field_}'")
    kind = m["type"]
    if kind in ("bind", "cache", "tmpfs") and "target" not in m:
        raise ValueError(f"mount type {kind} requires a target (target=/path)")
    if kind == "secret" and "target" not in m and "id" not in m and "env" not in m:
        raise ValueError("secret mount requires an id or a target")
    if kind == "secret" and "id" not in m and "target" in m:
        m["id"] = m["target"].rstrip("/").rsplit("/", 1)[-1]  # BuildKit: the id defaults to the target's base name
    if kind == "secret" and "target" not in m and "env" not in m:
        m["target"] = "/run/secrets/" + m["id"]
    if kind == "ssh":
        m.setdefault("id", "default")
        m.setdefault("target", "/run/buildkit/ssh_agent.0")
    if kind in ("bind", "cache") and "readonly" not in m:
        m["readonly"] = kind == "bind"
    if "sharing" in m and kind != "cache":
        raise ValueError("sharing is only allowed for cache mounts")
    if kind == "cache" and "sharing" not in m:
        m["sharing"] = "shared"
    return m


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


def _cmd(node: Node) -> dict:
    args = node.tokens()
    if node.attributes.get("json"):
        return {"json": True, "cmd": args}
    return {"json": False, "cmd": " ".join(args)}


def from_node(node: Node, filename: str = "Dockerfile") -> Instruction:
    kind = node.value.lower()
    inst = Instruction(kind, node.start_line, node.end_line, node.original, heredocs=node.heredocs)
    try:
        inst.flags = parse_flags(kind, node.flags)
        inst.spec = _spec(kind, node, inst.flags)
    except ValueError as e:
        raise InstructionError(str(e), node.start_line, node.end_line, filename) from None
    return inst


def _spec(kind: str, node: Node, flags: dict) -> dict:
    args = node.tokens()
    n = len(args)
    if kind == "from":
        if n not in (1, 3) or (n == 3 and args[1].lower() != "as"):
            raise ValueError("FROM requires either one or three arguments")
        name = args[2].lower() if n == 3 else ""
        if name and not _STAGE_NAME.match(name):
            raise ValueError(f'invalid name for build stage: "{args[2]}", name can\'t start with a number or contain symbols')
        return {"image": args[0], "name": name}
    if kind == "arg":
        if not args:
            raise ValueError("ARG requires at least one argument")
        out = []
        for w in args:
            key, has_value, value = w.partition("=")
            if not key:
                raise ValueError("ARG names can not be blank")
            out.append({"key": key, "default": value if has_value else None})
        return {"args": out}
    if kind in ("env", "label"):
        if not args:
            raise ValueError(f"{kind.upper()} requires at least one argument")
        if n % 3:
            raise ValueError(f"Bad input to {kind.upper()}, too many arguments")
        pairs = []
        for i in range(0, n, 3):
            if not args[i]:
                raise ValueError(f"{kind.upper()} names can not be blank")
            pairs.append({"key": args[i], "value": args[i + 1]})
        return {"pairs": pairs}
    if kind == "run":
        spec = _cmd(node)
        spec["mounts"] = [parse_mount(m) for m in flags.get("mount", [])]
        if "network" in flags and flags["network"] not in NETWORK_MODES:
            raise ValueError(f"unsupported network mode {flags['network']!r} (want default, none or host)")
        if "security" in flags and flags["security"] not in SECURITY_MODES:
            raise ValueError(f"unsupported security mode {flags['security']!r} (want sandbox or insecure)")
        spec["files"] = [{"name": h.name, "data": h.content, "chomp": h.chomp, "expand": h.expand} for h in node.heredocs]
        if not args and not node.heredocs:
            raise ValueError("RUN requires at least one argument")
        return spec
    if kind in ("cmd", "entrypoint"):
        return _cmd(node)
    if kind == "shell":
        if not node.attributes.get("json"):
            raise ValueError("SHELL requires the arguments to be in JSON form")
        if not args:
            raise ValueError("SHELL requires at least one argument")
        return {"shell": args}
    if kind in ("copy", "add"):
        heredoc_names = {h.name for h in node.heredocs}
        if n < 2 and not (n == 1 and heredoc_names):
            raise ValueError(f"{kind.upper()} requires at least two arguments, but only one was provided. "
                             "Destination could not be determined")
        if "from" in flags and kind == "add":
            raise ValueError("unknown flag: from")
        sources = args[:-1]
        docs = {h.name: h for h in node.heredocs}
        files = [{"name": h.name, "data": h.content, "chomp": h.chomp, "expand": h.expand} for h in node.heredocs]
        sources = [s for s in sources if not (s.startswith("<<") and s.lstrip("<-").strip("'\"") in docs)]
        return {"sources": sources, "dest": args[-1], "files": files}
    if kind in ("workdir", "user", "stopsignal", "maintainer"):
        if n != 1 or not args[0]:
            raise ValueError(f"{kind.upper()} requires exactly one argument")
        return {"value": args[0]}
    if kind == "expose":
        if not args:
            raise ValueError("EXPOSE requires at least one argument")
        return {"ports": args}
    if kind == "volume":
        if not args:
            raise ValueError("VOLUME requires at least one argument")
        if any(not v.strip() for v in args):
            raise ValueError("VOLUME specified can not be an empty string")
        return {"paths": args}
    if kind == "healthcheck":
        if not args:
            raise ValueError("HEALTHCHECK requires at least one argument")
        typ = args[0].upper()
        if typ == "NONE":
            if n > 1 or flags:
                raise ValueError("HEALTHCHECK NONE takes no arguments")
            return {"test": ["NONE"]}
        if typ != "CMD":
            raise ValueError(f'Unknown type "{args[0]}" in HEALTHCHECK (try CMD)')
        rest = args[1:]
        if not rest:
            raise ValueError("Missing command after HEALTHCHECK CMD")
        test = (["CMD"] + rest) if node.attributes.get("json") else ["CMD-SHELL", " ".join(rest)]
        spec: dict = {"test": test}
        for flag in ("interval", "timeout", "start-period", "start-interval"):
            if flag in flags:
                seconds = parse_duration_s(flags[flag], flag)
                if 0 < seconds < 0.001:
                    raise ValueError(f'Interval "{flag}" cannot be less than 1ms')
                spec[flag.replace("-", "_") + "_s"] = seconds
        if "retries" in flags:
            try:
                retries = int(flags["retries"])
            except ValueError:
                raise ValueError(f"--retries expects an integer, not {flags['retries']!r}") from None
            if retries < 0:
                raise ValueError(f"--retries cannot be negative ({retries})")
            spec["retries"] = retries
        return spec
    if kind == "onbuild":
        if node.next is None or not node.next.children:
            raise ValueError("ONBUILD requires at least one argument")
        trigger = node.next.children[0]
        what = trigger.value.upper()
        if what == "ONBUILD":
            raise ValueError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
        if what in ("FROM", "MAINTAINER"):
            raise ValueError(f"{what} isn't allowed as an ONBUILD trigger")
        return {"trigger": node.original.strip()[len(node.value):].strip()}
    raise ValueError(f"unknown instruction: {node.value.upper()}")


def instructions(result: Result, filename: str = "Dockerfile") -> list[Instruction]:
    return [from_node(child, filename) for child in result.ast.children]
