"""Stages, ARG scoping, variable expansion and the image config, as BuildKit's dockerfile2llb sees them.

`load()` turns Dockerfile text into the stages a build needs (the target and what it depends on). Each
stage holds its instructions expanded where BuildKit expands them, the context each one sees (env,
working directory, user, shell), the step it makes if it changes the filesystem (steps.py), and the
image config (with history) the stage leaves. Both the LLB converter and the daemonless builder start
from this and read only the steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
from dataclasses import dataclass
from typing import Callable

from .instructions import (Add, Arg, ArgDecl, Cmd, Copy, Entrypoint, Env, Expose, FileCopy, From, Healthcheck,
                           Instruction, InstructionError, KeyValue, Label, Maintainer, Onbuild, Run, Shell, StopSignal,
                           User, Volume, Workdir, instructions)
from .parser import DockerfileError, Warning, parse  # noqa: A004 - the parser's Warning
from .shell import ShellError, ShellLex
from .steps import Context, Step, expanded_heredoc, step_for

DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_ARGS = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")


@dataclass(frozen=True)
class Resolved:
    """One instruction of a stage as the build sees it."""

    instruction: Instruction  # expanded where BuildKit expands, stage references resolved
    context: Context  # the state the instructions before it left
    step: Step | None  # the filesystem change it makes, if any

    def to_json(self) -> dict:
        ins, ctx = self.instruction, self.context
        out: dict = {"instruction": ins.keyword, "line": ins.line, "text": ins.text}
        match ins:
            case Arg():
                out["args"] = [a.to_json() for a in ins.args]
            case Env() | Label():
                out["pairs"] = [p.to_json() for p in ins.pairs]
            case Workdir():
                out.update(path=ins.path, user=ctx.user)
            case User():
                out["user"] = ins.user
            case StopSignal():
                out["signal"] = ins.signal
            case Expose():
                out["ports"] = list(ins.ports)
            case Volume():
                out["paths"] = list(ins.paths)
            case Shell():
                out["shell"] = list(ins.shell)
            case Cmd():
                out["cmd"] = list(ins.command.argv(ctx.shell))
            case Entrypoint():
                out["entrypoint"] = list(ins.command.argv(ctx.shell))
            case Healthcheck():
                out["healthcheck"] = ins.to_config()
            case Onbuild():
                out["trigger"] = ins.trigger
            case Maintainer():
                out["maintainer"] = ins.maintainer
            case Run():
                out.update(_run_json(ins, ctx))
            case FileCopy():
                out.update(_copy_json(ins, ctx))
        return out


def _run_json(ins: Run, ctx: Context) -> dict:
    out: dict = {"cmd": list(ins.command.argv(ctx.shell)), "shellForm": not ins.command.exec_form}
    if ins.mounts:
        out["mounts"] = [m.to_json() for m in ins.mounts]
    if ins.network is not None:
        out["network"] = ins.network
    if ins.security is not None:
        out["security"] = ins.security
    if ins.heredocs:
        out["files"] = [h.to_json() for h in ins.heredocs]
    if ctx.proxy_env:
        out["proxyEnv"] = {p.key: p.value for p in ctx.proxy_env}
    out.update(env=list(ctx.env), workdir=ctx.workdir, user=ctx.user)
    return out


def _copy_json(ins: FileCopy, ctx: Context) -> dict:
    out: dict = {"sources": list(ins.sources), "dest": ins.dest}
    add = ins if isinstance(ins, Add) else None
    cp = ins if isinstance(ins, Copy) else None
    for key, value in (("chown", ins.chown), ("chmod", ins.chmod), ("checksum", add and add.checksum),
                       ("link", ins.link), ("parents", cp and cp.parents), ("keep-git-dir", add and add.keep_git_dir),
                       ("unpack", add and add.unpack)):
        if value is not None:
            out[key] = value
    if ins.exclude is not None:
        out["exclude"] = list(ins.exclude)
    if cp and cp.from_ is not None:
        out["from"] = cp.from_
        if cp.from_stage is not None:
            out["fromStage"] = cp.from_stage
    if ins.heredocs:
        out["files"] = [{"name": h.name, "data": h.data} for h in ins.heredocs]
    out["workdir"] = ctx.workdir
    return out


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    base: str  # an image reference, "scratch", or the name of an earlier stage
    base_stage: int | None
    platform: str
    line: int
    instructions: tuple[Resolved, ...] = ()
    config: dict = dataclasses.field(default_factory=dict)  # the OCI image config this stage leaves
    history: tuple[dict, ...] = ()  # the OCI history entries, base image's first
    depends_on: tuple[int, ...] = ()

    @property
    def steps(self) -> tuple[Step, ...]:
        """The filesystem changes of this stage, in order: what the back ends execute."""
        return tuple(r.step for r in self.instructions if r.step is not None)

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "base": self.base, "baseStage": self.base_stage,
                "platform": self.platform, "line": self.line, "dependsOn": list(self.depends_on),
                "instructions": [r.to_json() for r in self.instructions], "config": self.config,
                "history": list(self.history)}


@dataclass(frozen=True)
class Build:
    stages: tuple[Stage, ...]  # only those the target needs, in dependency order
    target: Stage
    meta_args: dict[str, str]
    escape_token: str
    syntax: str
    warnings: tuple[Warning, ...]

    def stage(self, index: int) -> Stage:
        return next(s for s in self.stages if s.index == index)

    def to_json(self) -> dict:
        return {"syntax": self.syntax, "target": self.target.name or self.target.index,
                "metaArgs": self.meta_args, "stages": [s.to_json() for s in self.stages],
                "config": self.target.config, "warnings": [str(w) for w in self.warnings]}


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


@dataclass
class _Header:
    """A stage as its FROM line gives it, before its instructions are resolved."""

    index: int
    name: str
    base: str
    base_stage: int | None
    platform: str
    line: int
    body: list[Instruction]


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

    def expand(word: str, env: dict[str, str], ins: Instruction) -> str:
        try:
            return lex.process_word(word, env)
        except ShellError as e:
            raise DockerfileError(f"{ins.keyword}: {e}", ins.line, ins.end_line, filename) from None

    # Global ARGs: before the first FROM, visible in FROM lines (and to stages that redeclare them).
    meta: dict[str, str] = dict(predefined)
    i = 0
    while i < len(insts) and isinstance(insts[i], Arg):
        for a in insts[i].args:
            default = expand(a.value, meta, insts[i]) if a.value is not None else None
            value = build_args.get(a.key, default)
            if value is not None:
                meta[a.key] = value
            else:
                meta.pop(a.key, None)
        i += 1
    if i < len(insts) and not isinstance(insts[i], From):
        raise DockerfileError("no build stage in current context (the first instruction must be FROM)",
                              insts[i].line, insts[i].end_line, filename)

    headers: list[_Header] = []
    by_name: dict[str, int] = {}
    for ins in insts[i:]:
        if isinstance(ins, From):
            image = expand(ins.image, meta, ins)
            plat = expand(ins.platform, meta, ins) or platform
            if not image:
                raise DockerfileError("base name (FROM) should not be blank", ins.line, ins.end_line, filename)
            h = _Header(len(headers), ins.name, image, by_name.get(image.lower()), plat, ins.line, [])
            if h.name:
                if h.name in by_name:
                    raise DockerfileError(f"duplicate stage name {h.name!r}", ins.line, ins.end_line, filename)
                by_name[h.name] = h.index
            headers.append(h)
        else:
            headers[-1].body.append(ins)

    target_index = len(headers) - 1
    if target:
        if target.lower() not in by_name:
            raise DockerfileError(f"target stage {target!r} could not be found", 0, 0, filename)
        target_index = by_name[target.lower()]

    resolver = _StageResolver(by_name, meta, build_args, expand, lex, filename, target, base_configs or {})
    stages = [resolver.resolve(h) for h in headers]

    needed = _needed(stages, target_index)
    syntax = next((d.value for d in result.directives if d.name == "syntax"), "")
    return Build(tuple(s for s in stages if s.index in needed), stages[target_index],
                 {k: v for k, v in meta.items() if k not in predefined}, result.escape_token, syntax,
                 tuple(result.warnings))


def _needed(stages: list[Stage], target: int) -> set[int]:
    todo, seen = [target], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(stages[i].depends_on)
    return seen


class _StageResolver:
    """Walks each stage's instructions in order: expands them in the scope they see, updates the image
    config and history, and asks steps.py for the step each one makes."""

    def __init__(self, by_name: dict[str, int], meta: dict[str, str], build_args: dict[str, str],
                 expand: Callable[[str, dict, Instruction], str], lex: ShellLex, filename: str, target: str,
                 base_configs: dict[str, dict]):
        self.by_name, self.meta, self.build_args = by_name, meta, build_args
        self.expand_word, self.lex, self.filename, self.target = expand, lex, filename, target
        self.base_configs = base_configs
        self.stages: list[Stage] = []
        self.stage_args: list[dict[str, str]] = []  # each stage's ARG values, inherited by stages built on it

    def resolve(self, h: _Header) -> Stage:
        self.index = h.index
        self.depends_on: list[int] = []
        config, history, args, triggers = self._start(h)
        self.config = config
        self.scope = _Scope(config["Env"], args)
        self.cmd_set = False
        body = h.body
        if triggers:  # ONBUILD triggers of the base run first, as if written at the top of this stage
            text = "FROM scratch\n" + "\n".join(triggers) + "\n"
            body = instructions(parse(text, self.filename), self.filename)[1:] + body
        resolved = []
        for ins in body:
            ctx = self._context()
            try:
                expanded, created_by = self._apply(ins)
                step = step_for(expanded, ctx)
            except ValueError as e:
                raise DockerfileError(str(e), ins.line, ins.end_line, self.filename) from None
            resolved.append(Resolved(expanded, ctx, step))
            entry = {"created_by": created_by, "comment": "buildkit.dockerfile.v0"}
            if step is None:
                entry["empty_layer"] = True
            history.append(entry)
        config["Env"] = self.scope.env
        self.stage_args.append(self.scope.args)
        stage = Stage(h.index, h.name, h.base, h.base_stage, h.platform, h.line, tuple(resolved), config,
                      tuple(history), tuple(self.depends_on))
        self.stages.append(stage)
        return stage

    def _start(self, h: _Header) -> tuple[dict, list[dict], dict[str, str], list[str]]:
        """The config, history, ARG values and ONBUILD triggers a stage starts from."""
        if h.base_stage is not None:
            base = self.stages[h.base_stage]
            config = copy.deepcopy(base.config)
            history = copy.deepcopy(list(base.history))
            args = dict(self.stage_args[h.base_stage])  # stages inherit the build args of their base stage
            self.depends_on.append(h.base_stage)
            triggers = list(base.config.get("OnBuild") or [])
        else:
            base_image = self.base_configs.get(h.base, {}) if h.base != "scratch" else {}
            # BuildKit's empty image (scratch) starts at WorkingDir "/"; an image keeps its config and history.
            config = copy.deepcopy(base_image.get("config") or {}) if h.base != "scratch" else {"WorkingDir": "/"}
            history = copy.deepcopy(base_image.get("history") or [])
            args = {}
            triggers = list(config.get("OnBuild") or [])
        config.pop("OnBuild", None)
        for key in [k for k, v in config.items() if v is None]:  # JSON nulls from the registry: absent
            del config[key]
        config.setdefault("Env", [])
        if not any(kv.partition("=")[0] == "PATH" for kv in config["Env"] or []):
            config["Env"] = list(config["Env"] or []) + [f"PATH={DEFAULT_PATH}"]  # BuildKit always sets PATH
        return config, history, args, triggers

    def _context(self) -> Context:
        # Proxy args reach RUN's environment without an ARG line, and never enter the image or its cache key.
        proxies = {k: v for k, v in {**self.build_args, **self.scope.args}.items() if k.upper() in PROXY_ARGS}
        return Context(env=tuple(f"{k}={v}" for k, v in self.scope.mapping().items()),
                       workdir=self.config.get("WorkingDir") or "/", user=self.config.get("User") or "",
                       shell=tuple(self.config.get("Shell") or DEFAULT_SHELL),
                       proxy_env=tuple(KeyValue(k, v) for k, v in proxies.items()))

    def _stage_ref(self, ref: str) -> int | None:
        """The index of the earlier stage REF names (by name or number), or None for an image."""
        if ref.lower() in self.by_name and self.by_name[ref.lower()] < self.index:
            return self.by_name[ref.lower()]
        if ref.isdigit():
            n = int(ref)
            if n >= self.index:
                raise ValueError(f"invalid stage reference {ref!r}: a stage can only use earlier stages")
            return n
        return None

    def _apply(self, ins: Instruction) -> tuple[Instruction, str]:
        """Expand INS in the current scope and apply it to the config: (the expanded instruction, its
        history's created_by)."""
        config = self.config
        env = self.scope.mapping()

        def x(word: str) -> str:
            return self.expand_word(word, env, ins)

        match ins:
            case Arg():
                decls = tuple(ArgDecl(a.key, self._arg_value(a, x)) for a in ins.args)
                for a in decls:
                    if a.value is not None:
                        self.scope.args[a.key] = a.value
                return dataclasses.replace(ins, args=decls), "ARG " + " ".join(
                    f"{a.key}={a.value}" if a.value is not None else a.key for a in decls)
            case Env():
                pairs = []
                for p in ins.pairs:
                    key, value = x(p.key), x(p.value)
                    self.scope.set_env(key, value)
                    env = self.scope.mapping()  # later pairs of one ENV see earlier ones
                    pairs.append(KeyValue(key, value))
                config["Env"] = self.scope.env
                return dataclasses.replace(ins, pairs=tuple(pairs)), "ENV " + " ".join(
                    f"{p.key}={p.value}" for p in pairs)
            case Label():
                pairs = tuple(KeyValue(x(p.key), x(p.value)) for p in ins.pairs)
                labels = config.setdefault("Labels", {})
                for p in pairs:
                    labels[p.key] = p.value
                return dataclasses.replace(ins, pairs=pairs), "LABEL " + " ".join(f"{p.key}={p.value}" for p in pairs)
            case Workdir():
                path = x(ins.path)
                if not path.startswith("/"):
                    path = posixpath.normpath(posixpath.join(config.get("WorkingDir") or "/", path))
                config["WorkingDir"] = path
                return dataclasses.replace(ins, path=path), f"WORKDIR {path}"
            case User():
                config["User"] = x(ins.user)
                return dataclasses.replace(ins, user=config["User"]), f"USER {config['User']}"
            case StopSignal():
                config["StopSignal"] = x(ins.signal)
                return dataclasses.replace(ins, signal=config["StopSignal"]), f"STOPSIGNAL {config['StopSignal']}"
            case Expose():
                ports = tuple(p for word in ins.ports for p in self.lex.process_words(word, env))
                for p in ports:
                    for port in _port_specs(p):
                        config.setdefault("ExposedPorts", {})[port] = {}
                return dataclasses.replace(ins, ports=ports), "EXPOSE " + " ".join(ports)
            case Volume():
                paths = tuple(x(v) for v in ins.paths)
                for v in paths:
                    config.setdefault("Volumes", {})[v] = {}
                return dataclasses.replace(ins, paths=paths), "VOLUME " + json.dumps(list(paths))
            case Shell():
                config["Shell"] = list(ins.shell)
                return ins, "SHELL " + json.dumps(list(ins.shell))
            case Cmd() | Entrypoint():
                value = list(ins.command.argv(tuple(config.get("Shell") or DEFAULT_SHELL)))
                if isinstance(ins, Cmd):
                    config["Cmd"] = value
                    self.cmd_set = True
                else:
                    config["Entrypoint"] = value
                    if not self.cmd_set:
                        config.pop("Cmd", None)  # a new ENTRYPOINT drops an inherited CMD
                return ins, f"{ins.keyword} {json.dumps(value)}"
            case Healthcheck():
                config["Healthcheck"] = ins.to_config()
                return ins, f"HEALTHCHECK {json.dumps(config['Healthcheck'])}"
            case Onbuild():
                config.setdefault("OnBuild", []).append(ins.trigger)
                return ins, f"ONBUILD {ins.trigger}"
            case Maintainer():
                config["Author"] = ins.maintainer
                return ins, f"MAINTAINER {ins.maintainer}"
            case Run():
                return self._run(ins, x)
            case FileCopy():
                expanded = self._copy(ins, x, env)
                return expanded, f"{ins.keyword} " + " ".join(expanded.sources + (expanded.dest,)) + " # buildkit"
        raise ValueError(f"unknown instruction: {ins.keyword}")

    def _arg_value(self, a: ArgDecl, x: Callable[[str], str]) -> str | None:
        default = x(a.value) if a.value is not None else None
        if a.key in self.build_args:
            return self.build_args[a.key]
        if default is not None:
            return default
        if a.key in self.meta:  # redeclaring a global ARG (or a predefined one) brings its value in
            return self.meta[a.key]
        if a.key == "TARGETSTAGE":
            return self.target
        return None

    def _run(self, ins: Run, x: Callable[[str], str]) -> tuple[Run, str]:
        mounts = []
        for m in ins.mounts:
            m = dataclasses.replace(m, **{f.name: x(getattr(m, f.name)) for f in dataclasses.fields(m)
                                          if isinstance(getattr(m, f.name), str)})
            if m.from_ is not None:
                ref = self._stage_ref(m.from_)
                if ref is not None:
                    m = dataclasses.replace(m, from_stage=ref)
                    self.depends_on.append(ref)
            mounts.append(m)
        expanded = dataclasses.replace(ins, mounts=tuple(mounts))
        env_keys = {kv.partition("=")[0] for kv in self.scope.env}
        used = {a: v for a, v in self.scope.args.items() if a not in env_keys}
        prefix = f"|{len(used)} " + " ".join(f"{a}={v}" for a, v in sorted(used.items())) + " " if used else ""
        shown = ins.command.argv(tuple(self.config.get("Shell") or DEFAULT_SHELL))
        return expanded, "RUN " + prefix + " ".join(shown) + " # buildkit"

    def _copy(self, ins: FileCopy, x: Callable[[str], str], env: dict[str, str]) -> FileCopy:
        changes: dict = {"sources": tuple(x(s) for s in ins.sources), "dest": x(ins.dest)}
        for flag in ("chown", "chmod"):
            if getattr(ins, flag) is not None:
                changes[flag] = x(getattr(ins, flag))
        if ins.exclude is not None:
            changes["exclude"] = tuple(x(e) for e in ins.exclude)
        if isinstance(ins, Add) and ins.checksum is not None:
            changes["checksum"] = x(ins.checksum)
        if isinstance(ins, Copy) and ins.from_ is not None:
            if "$" in ins.from_:  # BuildKit refuses variables here rather than expanding them
                raise ValueError(f"COPY --from does not support variables: {ins.from_!r}; use a stage name or image")
            ref = self._stage_ref(ins.from_)
            if ref is not None:
                changes["from_stage"] = ref
                self.depends_on.append(ref)
        if ins.heredocs:
            # Heredoc contents are expanded like a word, but quotes and escapes stay as written.
            raw = ShellLex(self.lex.escape_token, raw_quotes=True, raw_escapes=True)

            def expand_doc(data: str) -> str:
                try:
                    return raw.process_word(data, env)
                except ShellError as e:
                    raise ValueError(f"{ins.keyword}: {e}") from None

            changes["heredocs"] = tuple(expanded_heredoc(h, expand_doc) for h in ins.heredocs)
        return dataclasses.replace(ins, **changes)


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


__all__ = ["Build", "Stage", "Resolved", "load", "DockerfileError", "InstructionError"]
