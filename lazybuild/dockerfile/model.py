"""Stages, ARG scoping, variable expansion and the image config, as BuildKit's dockerfile2llb sees them.

`load()` turns Dockerfile text into the stages a build needs (the target and what it depends on), each
with its instructions expanded where BuildKit expands them and the image config (with history) that
each instruction leaves. Both the LLB converter and the daemonless builder start from this.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

from .instructions import Instruction, InstructionError, instructions
from .parser import DockerfileError, parse
from .shell import ShellError, ShellLex

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_ARGS = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
# Instructions that leave a filesystem change; the others are empty layers in the history.
LAYER_KINDS = ("run", "copy", "add")
# A RUN whose script is only `<<NAME` (or `<<-NAME`, quoted or not): the heredoc is the script itself.
HEREDOC_MARKER = re.compile(r"^<<(-?)\s*(['\"]?)([^'\"\s]+)\2$")


@dataclass
class Stage:
    index: int
    name: str
    base: str  # an image reference, "scratch", or the name of an earlier stage
    base_stage: int | None
    platform: str
    line: int
    instructions: list[dict] = field(default_factory=list)  # expanded, as JSON-able dicts
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    depends_on: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "base": self.base, "baseStage": self.base_stage,
                "platform": self.platform, "line": self.line, "dependsOn": self.depends_on,
                "instructions": self.instructions, "config": self.config, "history": self.history}


@dataclass
class Build:
    stages: list[Stage]  # only those the target needs, in dependency order
    target: Stage
    meta_args: dict[str, str]
    escape_token: str
    syntax: str
    warnings: list[str]

    def to_json(self) -> dict:
        return {"syntax": self.syntax, "target": self.target.name or self.target.index,
                "metaArgs": self.meta_args, "stages": [s.to_json() for s in self.stages],
                "config": self.target.config, "warnings": self.warnings}


def platform_args(target: str, build: str) -> dict[str, str]:
    """TARGET* / BUILD* predefined args from os/arch[/variant] strings."""
    out = {}
    for prefix, plat in (("TARGET", target), ("BUILD", build)):
        parts = plat.split("/")
        out[prefix + "PLATFORM"] = plat
        out[prefix + "OS"] = parts[0]
        out[prefix + "ARCH"] = parts[1] if len(parts) > 1 else ""
        out[prefix + "VARIANT"] = parts[2] if len(parts) > 2 else ""
    return out


class _Scope:
    """What `$x` means at one point of a stage: its ENV, then the ARGs declared so far."""

    def __init__(self, env: list[str], args: dict[str, str]):
        self.env = list(env)
        self.args = dict(args)

    def mapping(self) -> dict[str, str]:
        m = dict(self.args)
        for kv in self.env:  # ENV wins over ARG of the same name, as in BuildKit
            k, _, v = kv.partition("=")
            m[k] = v
        return m

    def set_env(self, key: str, value: str) -> None:
        for i, kv in enumerate(self.env):  # replaced in place, as BuildKit's addEnv does
            if kv.partition("=")[0] == key:
                self.env[i] = f"{key}={value}"
                return
        self.env.append(f"{key}={value}")


def load(text: str, *, filename: str = "Dockerfile", build_args: dict[str, str] | None = None,
         target: str = "", platform: str = "linux/amd64", build_platform: str = "linux/amd64",
         base_configs: dict[str, dict] | None = None) -> Build:
    """Parse and resolve a Dockerfile. `base_configs` maps image references to their image config
    (as the registry would give it) when known; otherwise an image base starts from an empty config."""
    result = parse(text, filename)
    insts = instructions(result, filename)
    build_args = dict(build_args or {})
    lex = ShellLex(result.escape_token)
    predefined = platform_args(platform, build_platform)

    def expand(word: str, env: dict[str, str], inst: Instruction) -> str:
        try:
            return lex.process_word(word, env)
        except ShellError as e:
            raise DockerfileError(f"{inst.kind.upper()}: {e}", inst.line, inst.end_line, filename) from None

    # Global ARGs: before the first FROM, visible in FROM lines (and to stages that redeclare them).
    meta: dict[str, str] = dict(predefined)
    i = 0
    while i < len(insts) and insts[i].kind == "arg":
        for a in insts[i].spec["args"]:
            default = expand(a["default"], meta, insts[i]) if a["default"] is not None else None
            value = build_args.get(a["key"], default)
            if value is not None:
                meta[a["key"]] = value
            else:
                meta.pop(a["key"], None)
        i += 1
    if i < len(insts) and insts[i].kind != "from":
        raise DockerfileError("no build stage in current context (the first instruction must be FROM)",
                              insts[i].line, insts[i].end_line, filename)

    stages: list[Stage] = []
    by_name: dict[str, int] = {}
    stage_insts: list[list[Instruction]] = []
    for inst in insts[i:]:
        if inst.kind == "from":
            image = expand(inst.spec["image"], meta, inst)
            plat = expand(inst.flags.get("platform", ""), meta, inst) or platform
            if not image:
                raise DockerfileError("base name (FROM) should not be blank", inst.line, inst.end_line, filename)
            base_stage = by_name.get(image.lower())
            st = Stage(len(stages), inst.spec["name"], image, base_stage, plat, inst.line)
            if st.name:
                if st.name in by_name:
                    raise DockerfileError(f"duplicate stage name {st.name!r}", inst.line, inst.end_line, filename)
                by_name[st.name] = st.index
            stages.append(st)
            stage_insts.append([])
        else:
            stage_insts[-1].append(inst)

    target_index = len(stages) - 1
    if target:
        if target.lower() not in by_name:
            raise DockerfileError(f"target stage {target!r} could not be found", 0, 0, filename)
        target_index = by_name[target.lower()]

    stage_args: list[dict[str, str]] = []
    for st, body in zip(stages, stage_insts):
        _resolve_stage(st, body, stages, by_name, meta, build_args, predefined, expand, filename, stage_args,
                       base_configs or {}, lex, target or "")

    needed = _needed(stages, target_index)
    return Build([s for s in stages if s.index in needed], stages[target_index], {k: v for k, v in meta.items()
                 if k not in predefined}, result.escape_token, next((d.value for d in result.directives
                 if d.name == "syntax"), ""), result.warnings)


def _needed(stages: list[Stage], target: int) -> set[int]:
    todo, seen = [target], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(stages[i].depends_on)
    return seen


def _stage_ref(ref: str, stages: list[Stage], by_name: dict[str, int], current: int) -> int | None:
    if ref.lower() in by_name and by_name[ref.lower()] < current:
        return by_name[ref.lower()]
    if ref.isdigit():
        n = int(ref)
        if n >= current:
            raise ValueError(f"invalid stage reference {ref!r}: a stage can only use earlier stages")
        return n
    return None


def _resolve_stage(st: Stage, body: list[Instruction], stages, by_name, meta, build_args, predefined, expand,
                   filename, stage_args, base_configs, lex, target_name) -> None:
    if st.base_stage is not None:
        base = stages[st.base_stage]
        config = copy.deepcopy(base.config)
        history = copy.deepcopy(base.history)
        args = dict(stage_args[st.base_stage])  # stages inherit the build args of their base stage
        st.depends_on.append(st.base_stage)
        triggers = list(base.config.get("OnBuild") or [])
    else:
        base_image = base_configs.get(st.base, {}) if st.base != "scratch" else {}
        # BuildKit's empty image (scratch) starts at WorkingDir "/"; an image keeps its config and history.
        config = copy.deepcopy(base_image.get("config") or {}) if st.base != "scratch" else {"WorkingDir": "/"}
        history = copy.deepcopy(base_image.get("history") or [])
        args = {}
        triggers = list(config.get("OnBuild") or [])
    config.pop("OnBuild", None)
    for key in [k for k, v in config.items() if v is None]:  # JSON nulls from the registry: absent
        del config[key]
    config.setdefault("Env", [] if st.base == "scratch" or st.base not in base_configs else config.get("Env", []))
    if not any(kv.partition("=")[0] == "PATH" for kv in config["Env"] or []):
        config["Env"] = list(config["Env"] or []) + [f"PATH={DEFAULT_PATH}"]  # BuildKit always sets PATH
    scope = _Scope(config["Env"], args)
    cmd_set = False
    if triggers:  # ONBUILD triggers of the base run first, as if written at the top of this stage
        text = "FROM scratch\n" + "\n".join(triggers) + "\n"
        body = instructions(parse(text, filename), filename)[1:] + body

    for inst in body:
        env = scope.mapping()
        out: dict = {"instruction": inst.kind.upper(), "line": inst.line, "text": " ".join(inst.original.split())}
        empty_layer = inst.kind not in LAYER_KINDS
        created_by = inst.original.strip()
        k = inst.kind
        try:
            if k == "arg":
                for a in inst.spec["args"]:
                    key = a["key"]
                    default = expand(a["default"], env, inst) if a["default"] is not None else None
                    if key in build_args:
                        value = build_args[key]
                    elif default is not None:
                        value = default
                    elif key in meta:  # redeclaring a global ARG (or a predefined one) brings its value in
                        value = meta[key]
                    elif key == "TARGETSTAGE":
                        value = target_name
                    else:
                        value = None
                    if value is not None:
                        scope.args[key] = value
                    out.setdefault("args", []).append({"key": key, "value": value})
                created_by = "ARG " + " ".join(f"{a['key']}={a['value']}" if a["value"] is not None else a["key"]
                                               for a in out["args"])
            elif k == "env":
                pairs = []
                for p in inst.spec["pairs"]:
                    key, value = expand(p["key"], env, inst), expand(p["value"], env, inst)
                    scope.set_env(key, value)
                    env = scope.mapping()  # later pairs of one ENV see earlier ones
                    pairs.append({"key": key, "value": value})
                config["Env"] = scope.env
                out["pairs"] = pairs
                created_by = "ENV " + " ".join(f"{p['key']}={p['value']}" for p in pairs)
            elif k == "label":
                labels = config.setdefault("Labels", {})
                pairs = [{"key": expand(p["key"], env, inst), "value": expand(p["value"], env, inst)}
                         for p in inst.spec["pairs"]]
                for p in pairs:
                    labels[p["key"]] = p["value"]
                out["pairs"] = pairs
                created_by = "LABEL " + " ".join(f"{p['key']}={p['value']}" for p in pairs)
            elif k == "workdir":
                path = expand(inst.spec["value"], env, inst)
                if not path.startswith("/"):
                    path = _join(config.get("WorkingDir") or "/", path)
                config["WorkingDir"] = path
                out["path"] = path
                out["user"] = config.get("User") or ""  # WORKDIR creates its directory as this user
                created_by = f"WORKDIR {path}"
            elif k == "user":
                config["User"] = out["user"] = expand(inst.spec["value"], env, inst)
                created_by = f"USER {config['User']}"
            elif k == "stopsignal":
                config["StopSignal"] = out["signal"] = expand(inst.spec["value"], env, inst)
                created_by = f"STOPSIGNAL {config['StopSignal']}"
            elif k == "expose":
                ports = [p for word in inst.spec["ports"] for p in lex.process_words(word, env)]
                for p in ports:
                    for port in _port_specs(p):
                        config.setdefault("ExposedPorts", {})[port] = {}
                out["ports"] = ports
                created_by = "EXPOSE " + " ".join(ports)
            elif k == "volume":
                paths = [expand(v, env, inst) for v in inst.spec["paths"]]
                for v in paths:
                    config.setdefault("Volumes", {})[v] = {}
                out["paths"] = paths
                created_by = "VOLUME " + json.dumps(paths)
            elif k == "shell":
                config["Shell"] = out["shell"] = inst.spec["shell"]
                created_by = "SHELL " + json.dumps(inst.spec["shell"])
            elif k in ("cmd", "entrypoint"):
                value = _command(inst.spec, config)
                key = "Cmd" if k == "cmd" else "Entrypoint"
                config[key] = value
                if k == "cmd":
                    cmd_set = True
                elif not cmd_set:
                    config.pop("Cmd", None)  # a new ENTRYPOINT drops an inherited CMD
                out[key.lower()] = value
                created_by = f"{k.upper()} {json.dumps(value)}"
            elif k == "healthcheck":
                hc = {"Test": inst.spec["test"]}
                for src, dst in (("interval_s", "Interval"), ("timeout_s", "Timeout"), ("start_period_s", "StartPeriod"),
                                 ("start_interval_s", "StartInterval")):
                    if src in inst.spec:
                        hc[dst] = int(inst.spec[src] * 1e9)  # the image config holds nanoseconds
                if "retries" in inst.spec:
                    hc["Retries"] = inst.spec["retries"]
                config["Healthcheck"] = out["healthcheck"] = hc
                created_by = f"HEALTHCHECK {json.dumps(hc)}"
            elif k == "onbuild":
                config.setdefault("OnBuild", []).append(inst.spec["trigger"])
                out["trigger"] = inst.spec["trigger"]
                created_by = f"ONBUILD {inst.spec['trigger']}"
            elif k == "maintainer":
                config["Author"] = out["maintainer"] = inst.spec["value"]
                created_by = f"MAINTAINER {inst.spec['value']}"
            elif k == "run":
                out.update(_run(inst, env, expand, config, scope, stages, by_name, st, build_args))
                used = {a: v for a, v in scope.args.items() if a not in dict(kv.partition("=")[::2] for kv in scope.env)}
                prefix = f"|{len(used)} " + " ".join(f"{a}={v}" for a, v in sorted(used.items())) + " " if used else ""
                shown = out["cmd"] if isinstance(out["cmd"], list) else [out["cmd"]]
                created_by = "RUN " + prefix + " ".join(shown) + " # buildkit"
            elif k in ("copy", "add"):
                out.update(_copy(inst, env, expand, stages, by_name, st, lex))
                out["workdir"] = config.get("WorkingDir") or "/"
                created_by = f"{k.upper()} " + " ".join(out["sources"] + [out["dest"]]) + " # buildkit"
        except ValueError as e:
            raise DockerfileError(str(e), inst.line, inst.end_line, filename) from None
        st.instructions.append(out)
        if k == "workdir" and out["path"] != "/":
            empty_layer = False  # WORKDIR makes its directory: a layer, as in BuildKit
        entry = {"created_by": created_by, "comment": "buildkit.dockerfile.v0"}
        if empty_layer:
            entry["empty_layer"] = True
        history.append(entry)
    config["Env"] = scope.env
    st.config, st.history = config, history
    stage_args.append(scope.args)


def _port_specs(spec: str) -> list[str]:
    """`80`, `53/udp`, `8000-8002[/proto]` -> ["8000/tcp", ...] as Docker's nat.ParsePortSpecs gives them."""
    port, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if ":" in port:
        port = port.rsplit(":", 1)[1]  # ip:host:container forms expose the container port
    low, dash, high = port.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise ValueError(f"invalid port {spec!r}: want port[-port][/tcp|udp|sctp]")
    if not dash:
        return [f"{int(low)}/{proto}"]
    if int(high) < int(low):
        raise ValueError(f"invalid port range {spec!r}: end before start")
    return [f"{p}/{proto}" for p in range(int(low), int(high) + 1)]


def _join(base: str, path: str) -> str:
    import posixpath

    return posixpath.normpath(posixpath.join(base, path))


def _command(spec: dict, config: dict) -> list[str]:
    if spec["json"]:
        return list(spec["cmd"])
    return list(config.get("Shell") or DEFAULT_SHELL) + [spec["cmd"]]


def _run(inst, env, expand, config, scope, stages, by_name, st, build_args) -> dict:
    out: dict = {"cmd": _command(inst.spec, config), "shellForm": not inst.spec["json"]}
    mounts = []
    for m in inst.spec["mounts"]:
        m = {k: (expand(v, env, inst) if isinstance(v, str) else v) for k, v in m.items()}
        if "from" in m:
            ref = _stage_ref(m["from"], stages, by_name, st.index)
            if ref is not None:
                m["fromStage"] = ref
                st.depends_on.append(ref)
        mounts.append(m)
    if mounts:
        out["mounts"] = mounts
    for key in ("network", "security"):
        if key in inst.flags:
            out[key] = inst.flags[key]
    if inst.spec["files"]:
        out["files"] = inst.spec["files"]
    # Proxy args reach RUN's environment without an ARG line, and never enter the image or its cache key.
    proxies = {k: v for k, v in {**build_args, **scope.args}.items() if k.upper() in PROXY_ARGS}
    if proxies:
        out["proxyEnv"] = proxies
    out["env"] = [f"{k}={v}" for k, v in scope.mapping().items()]
    out["workdir"] = config.get("WorkingDir") or "/"
    out["user"] = config.get("User") or ""
    return out


def _copy(inst, env, expand, stages, by_name, st, lex) -> dict:
    out: dict = {"sources": [expand(s, env, inst) for s in inst.spec["sources"]],
                 "dest": expand(inst.spec["dest"], env, inst)}
    for flag in ("chown", "chmod", "checksum"):
        if flag in inst.flags:
            out[flag] = expand(inst.flags[flag], env, inst)
    for flag in ("link", "parents", "keep-git-dir", "unpack"):
        if flag in inst.flags:
            out[flag] = inst.flags[flag]
    if "exclude" in inst.flags:
        out["exclude"] = [expand(x, env, inst) for x in inst.flags["exclude"]]
    if "from" in inst.flags:
        src = inst.flags["from"]
        if "$" in src:  # BuildKit refuses variables here rather than expanding them
            raise ValueError(f"COPY --from does not support variables: {src!r}; use a stage name or image")
        out["from"] = src
        ref = _stage_ref(src, stages, by_name, st.index)
        if ref is not None:
            out["fromStage"] = ref
            st.depends_on.append(ref)
    if inst.spec["files"]:
        # Heredoc contents are expanded like a word, but quotes and escapes stay as written.
        raw = ShellLex(lex.escape_token, raw_quotes=True, raw_escapes=True)
        files = []
        for f in inst.spec["files"]:
            data = f["data"]
            if f["chomp"]:
                data = "\n".join(line.lstrip("\t") for line in data.split("\n"))
            if f["expand"]:
                try:
                    data = raw.process_word(data, env)
                except ShellError as e:
                    raise ValueError(f"{inst.kind.upper()}: {e}") from None
            files.append({"name": f["name"], "data": data})
        out["files"] = files
    return out


__all__ = ["Build", "Stage", "load", "DockerfileError", "InstructionError"]
