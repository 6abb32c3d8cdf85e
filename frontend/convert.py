"""Dockerfile -> LLB: the steps of `lazybuild.dockerfile.model` become BuildKit ops.

The model has applied the Dockerfile's rules already (heredocs, mount defaults, WORKDIR, which
instructions are steps); this only translates its steps, as BuildKit's dockerfile2llb would emit them:
a RunStep runs on the stage's state with its mounts; a CopyStep is one file op with a copy per source;
a WorkdirStep makes its directory. The ops declare the BuildKit caps they use (llb/); a feature newer
than the daemon is refused here first, with its line (`require`), rather than in BuildKit's solver.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from lazybuild.registry.reference import Reference

from lazybuild.dockerfile.model import Build, Stage
from lazybuild.dockerfile.parser import DockerfileError
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.dockerfile.steps import (HEREDOC_FILE_MODE, PIPES_DIR, BindMount, CacheMount, CopyStep, RunStep,
                                        SecretMount, SshMount, TmpfsMount, WorkdirStep)
from .llb import builder as llb
from .llb.builder import State
from .llb.proto import ops_pb2 as pb

# BuildKit removes the mount points it had to make in a RUN's root (an empty /mnt after a bind to /mnt/t)
# when the ExecOp asks, since v0.11. The field's cap is declared upstream but never registered, so the
# daemon is known by a cap registered in the same release.
REMOVES_MOUNT_STUBS_CAPS = ("exec.meta.removemountstubs.recursive", "exporter.sourcedateepoch")

PROXY_FIELDS = {"HTTP_PROXY": "http_proxy", "HTTPS_PROXY": "https_proxy", "FTP_PROXY": "ftp_proxy",
                "NO_PROXY": "no_proxy", "ALL_PROXY": "all_proxy"}


class ConvertError(DockerfileError):
    """A Dockerfile feature this daemon (or this frontend) cannot build, with its line."""


@dataclass
class BuildOptions:
    """What the caller asked for: BuildKit's frontend options after parsing (see main.options)."""

    session_id: str = ""
    image_resolve_mode: str = "default"  # default | pull | local
    force_network_mode: str = ""  # "", host, none
    extra_hosts: list[tuple[str, str]] = field(default_factory=list)
    no_cache: set[str] | None = None  # None: cache on; empty set: all stages; else stage names
    cache_ns: str = ""
    excludes: list[str] = field(default_factory=list)  # .dockerignore patterns
    context: State | None = None  # a context given as an input or URL; else local://context
    named_contexts: dict[str, State] = field(default_factory=dict)
    context_name: str = "context"


def normalize_image(ref: str) -> str:
    """`alpine` -> `docker.io/library/alpine:latest`, as BuildKit names image sources."""
    r = Reference.parse(ref)
    return str(r)


def _abs(p: str) -> str:
    return posixpath.normpath(posixpath.join("/", p))


def _owner(who: str) -> int | str:
    if who.isdigit():
        return int(who)
    return 0 if who == "root" else who


def chown(spec: str) -> llb.Chown | None:
    """`--chown=user[:group]` (names or ids); names are looked up in the destination's /etc/passwd."""
    if not spec:
        return None
    user, _, group = spec.partition(":")
    return llb.Chown(_owner(user), _owner(group) if group else None)


class Converter:
    def __init__(self, build: Build, caps, opts: BuildOptions, platforms: dict[int, pb.Platform],
                 lex: ShellLex, filename: str = "Dockerfile"):
        self.build, self.caps, self.opts, self.filename = build, caps, opts, filename
        self.platforms = platforms  # stage index -> platform
        self.lex = lex  # kept for callers; the model has expanded everything already
        self.states: dict[int, State] = {}
        self.layers: dict[int, list[State]] = {}  # stage index -> the state after each layer step
        self._context: State | None = opts.context
        self._images: dict[tuple[str, llb.Platform], State] = {}
        self.removes_mount_stubs = any(caps.has(c) for c in REMOVES_MOUNT_STUBS_CAPS)

    # ---- errors and caps
    def fail(self, message: str, line: int) -> ConvertError:
        return ConvertError(message, line, line, self.filename)

    def require(self, cap: str, what: str, line: int) -> None:
        """Refuse `what` (at `line`) when the daemon lacks `cap`: here, with the line, rather than in
        BuildKit's solver."""
        if not self.caps.has(cap):
            raise self.fail(f"{what} needs the BuildKit capability {cap!r}, which this daemon does not have "
                            "(upgrade BuildKit / Docker)", line)

    def info(self, name: str, command: str = "") -> llb.Info:
        """A step's progress line, its instruction, and whether --no-cache reruns it."""
        return llb.Info(name, command, ignore_cache=self._ignore_cache)

    # ---- sources
    def image(self, ref: str, plat: pb.Platform) -> State:
        name = normalize_image(ref)
        key = (name, llb.Platform.of(plat))
        if key not in self._images:
            self._images[key] = llb.image(name, platform=plat, resolve_mode=self.opts.image_resolve_mode,
                                          info=llb.Info(f"FROM {name}"))
        return self._images[key]

    def context(self) -> State:
        if self._context is None:
            self._context = llb.local(self.opts.context_name, session_id=self.opts.session_id,
                                      shared_key_hint=self.opts.context_name, follow_paths=self._context_paths(),
                                      exclude_patterns=self.opts.excludes,
                                      info=llb.Info("[internal] load build context"))
        return self._context

    def _context_paths(self) -> list[str] | None:
        """The context paths the build reads (COPY/ADD sources, RUN bind mounts), so only those are sent;
        None when the whole context is needed."""
        paths: set[str] = set()
        for st in self.build.stages:
            for step in st.steps:
                if isinstance(step, CopyStep) and step.from_stage is None and not step.from_image:
                    for src in step.sources:
                        if src.kind == "path":
                            paths.add(_abs(src.text))
                if isinstance(step, RunStep):
                    for m in step.mounts:
                        if isinstance(m, BindMount) and m.from_stage is None and not m.from_image:
                            paths.add(m.source)
        if "/" in paths:
            return None
        return sorted(p.lstrip("/") for p in paths)

    def from_state(self, stage_index: int | None, ref: str) -> State:
        """The state of `--from=` / `from=`: an earlier stage, a named context, or an image."""
        if stage_index is not None:
            return self.states[stage_index]
        if ref in self.opts.named_contexts:
            return self.opts.named_contexts[ref]
        if ref == "scratch":
            return llb.scratch()
        return self.image(ref, self.platforms[self._stage.index])

    def chain(self, index: int) -> list[State]:
        """The states of stage INDEX from its root image: the base, then after each layer step."""
        st = next(s for s in self.build.stages if s.index == index)
        own = self.layers[index]
        if st.base_stage is not None:
            return self.chain(st.base_stage) + own[1:]
        return own

    # ---- stages
    def convert(self) -> dict[int, State]:
        for st in self.build.stages:
            self._stage = st
            self.states[st.index] = self._convert_stage(st)
        return self.states

    def _base(self, st: Stage) -> State:
        if st.base_stage is not None:
            return self.states[st.base_stage]
        if st.base in self.opts.named_contexts:
            return self.opts.named_contexts[st.base]
        if st.base == "scratch":
            return llb.scratch()
        return self.image(st.base, self.platforms[st.index])

    def _convert_stage(self, st: Stage) -> State:
        state = self._base(st)
        steps = st.steps
        label = st.name or f"stage-{st.index}"
        self._ignore_cache = self.opts.no_cache is not None and (not self.opts.no_cache or st.name in self.opts.no_cache)
        layers: list[State] = [state]
        for n, step in enumerate(steps, 1):
            name = f"[{label} {n}/{len(steps)}] {step.text}"
            match step:
                case RunStep():
                    state = self.run(state, step, name)
                case CopyStep():
                    state = self.copy(state, step, name)
                case WorkdirStep():
                    state = self.workdir(state, step, name)
            layers.append(state)
        self.layers[st.index] = layers
        return state

    # ---- RUN
    def run(self, state: State, step: RunStep, name: str) -> State:
        line = step.line
        proxy = None
        if step.proxy_env:
            self.require("exec.meta.proxyenv", "proxy build args", line)
            proxy = llb.ProxyEnv(**{PROXY_FIELDS[p.key.upper()]: p.value for p in step.proxy_env})
        network = step.network if step.network != "default" else self.opts.force_network_mode or ""
        if network in ("host", "none"):
            self.require("exec.meta.network", f"RUN --network={network}", line)
        else:
            network = "sandbox"
        insecure = step.security == "insecure"
        if insecure:
            self.require("exec.meta.security", "RUN --security=insecure", line)
        # A script's input has always been numbered before the root's; the op's digest depends on it.
        mounts = [self._inline_files(step), llb.ROOT] if step.inline_files else []
        mounts += [self._mount(m, line) for m in step.mounts]
        return state.run(step.argv, env=step.env, cwd=step.cwd, user=step.user, mounts=mounts, network=network,
                         insecure=insecure, proxy_env=proxy, extra_hosts=self.opts.extra_hosts,
                         remove_mount_stubs=self.removes_mount_stubs, platform=self.platforms[self._stage.index], info=self.info(name, "RUN " + step.command)).root()

    def _inline_files(self, step: RunStep) -> llb.Bind:
        """A `#!` heredoc script: made by a file op and mounted read-only at /dev/pipes/."""
        made = llb.scratch().file(*(llb.Mkfile("/" + f.name, f.data.encode(), mode=f.mode) for f in step.inline_files),
                                  info=llb.Info("preparing inline document"))
        return llb.Bind(PIPES_DIR + "/", made, selector="/", readonly=True)

    def _mount(self, m, line: int) -> llb.Mount:
        match m:
            case BindMount():
                if not m.readonly:
                    self.require("exec.mount.bind.readwrite-nooutput", "RUN --mount=type=bind,rw", line)
                own_context = m.from_stage is None and not m.from_image
                src = self.context() if own_context else self.from_state(m.from_stage, m.from_image)
                return llb.Bind(m.target, src, selector=m.source if m.source != "/" else "", readonly=m.readonly)
            case CacheMount():
                self.require("exec.mount.cache", "RUN --mount=type=cache", line)
                if m.sharing != "shared":
                    self.require("exec.mount.cache.sharing", "cache mount sharing", line)
                src, selector = llb.scratch(), ""
                if m.from_stage is not None or m.from_image:
                    src = self.from_state(m.from_stage, m.from_image)
                    selector = m.source if m.source != "/" else ""
                elif m.owned:
                    # An owned cache directory starts from a made directory, as BuildKit's frontend does.
                    src = llb.scratch().file(llb.Mkdir("/cache", mode=m.mode, make_parents=True,
                                                       owner=llb.Chown(m.uid, m.gid)),
                                             info=llb.Info("preparing cache mount"))
                    selector = "/cache"
                return llb.Cache(m.target, self.opts.cache_ns + "/" + m.id, sharing=m.sharing, source=src,
                                 selector=selector, readonly=m.readonly)
            case TmpfsMount():
                self.require("exec.mount.tmpfs", "RUN --mount=type=tmpfs", line)
                if m.size_bytes:
                    self.require("exec.mount.tmpfs.size", "tmpfs size", line)
                return llb.Tmpfs(m.target, m.size_bytes)
            case SecretMount():
                self.require("exec.mount.secret", "RUN --mount=type=secret", line)
                if m.env:
                    raise self.fail("RUN --mount=type=secret,env= is not supported by this frontend yet", line)
                return llb.Secret(m.target, m.id, uid=m.uid, gid=m.gid, mode=m.mode, optional=not m.required)
            case SshMount():
                self.require("exec.mount.ssh", "RUN --mount=type=ssh", line)
                return llb.SSH(m.target, m.id, uid=m.uid, gid=m.gid, mode=m.mode, optional=not m.required)
        raise TypeError(f"not a mount: {m!r}")

    # ---- COPY / ADD
    def copy(self, state: State, step: CopyStep, name: str) -> State:
        line = step.line
        mode, mode_str = None, ""
        if step.chmod:
            try:
                mode = int(step.chmod, 8)
            except ValueError:
                self.require("file.copy.modestring", f"--chmod={step.chmod} (not octal)", line)
                mode_str = step.chmod
        if step.exclude:
            self.require("file.copy.includeexcludepatterns", "--exclude", line)
        if step.parents:
            raise self.fail("COPY --parents is not supported by the lazybuild frontend yet", line)
        owner = chown(step.chown)

        def copy_of(source: State, src: str, unpack: bool = False) -> llb.Copy:
            return llb.Copy(source, src, step.dest, mode=mode, mode_str=mode_str, owner=owner, follow_symlinks=True,
                            copy_dir_contents=True, unpack_archive=unpack, create_dest_path=True,
                            allow_wildcard=True, allow_empty_wildcard=True, exclude=step.exclude)

        copies: list[llb.Copy] = []
        if step.from_stage is not None or step.from_image:
            source = self.from_state(step.from_stage, step.from_image)
            copies += [copy_of(source, _abs(src.text)) for src in step.sources]
        else:
            for src in step.sources:
                match src.kind:
                    case "git":
                        copies.append(copy_of(self._git(src.text, step), "/"))
                    case "url":
                        copies.append(copy_of(self._http(src.text, step), "/" + _url_filename(src.text)))
                    case _:
                        copies.append(copy_of(self.context(), _abs(src.text), step.unpack))
        for doc in step.files:
            made = llb.scratch().file(llb.Mkfile("/" + doc.name, doc.data.encode(), mode=HEREDOC_FILE_MODE),
                                      info=llb.Info("preparing inline document"))
            # The mode is set by the copy, not the mkfile, so the daemon's umask cannot change it.
            copies.append(llb.Copy(made, "/" + doc.name, step.dest, mode=doc.mode, mode_str=mode_str, owner=owner,
                                   create_dest_path=True, exclude=step.exclude))
        if not copies:
            raise self.fail(f"{step.keyword} has no source", line)
        if step.link and self.caps.has("mergeop") and not step.chmod:
            # --link: the files are copied onto scratch, and that layer is merged onto the stage.
            layer = llb.scratch().file(*copies, info=self.info(name, step.keyword))
            return llb.merge([state, layer], info=self.info(name))
        return state.file(*copies, info=self.info(name, step.keyword))

    def _http(self, url: str, step: CopyStep) -> State:
        if step.checksum:
            self.require("source.http.checksum", "ADD --checksum", step.line)
        return llb.http(url, filename=_url_filename(url), checksum=step.checksum, info=llb.Info(url))

    def _git(self, url: str, step: CopyStep) -> State:
        self.require("source.git", "ADD of a git repository", step.line)
        remote, _, fragment = url.partition("#")
        if ":" in fragment:
            self.require("source.git.subdir", "a git subdirectory (#ref:dir)", step.line)
        ident = re.sub(r"^(https?|ssh|git)://", "", remote)
        ident = re.sub(r"^[^@/]+@([^:/]+):", r"\1/", ident)  # git@host:path -> host/path
        return llb.git(ident, fragment, full_url=remote, keep_git_dir=step.keep_git_dir, info=llb.Info(url))

    # ---- WORKDIR
    def workdir(self, state: State, step: WorkdirStep, name: str) -> State:
        return state.file(llb.Mkdir(step.path, mode=0o755, make_parents=True, owner=chown(step.user)),
                          info=self.info(name, "WORKDIR"))


def _url_filename(url: str) -> str:
    path = url.split("?")[0].split("#")[0].rstrip("/")
    name = posixpath.basename(path.split("://", 1)[-1]) if "/" in path.split("://", 1)[-1] else ""
    return name or "__unnamed__"
