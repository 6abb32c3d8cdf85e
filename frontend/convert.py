"""Dockerfile -> LLB: the steps of `lazybuild.dockerfile.model` become BuildKit ops.

The model has applied the Dockerfile's rules already (heredocs, mount defaults, WORKDIR, which
instructions are steps); this only translates its steps, as BuildKit's dockerfile2llb would emit them:
a RunStep is an ExecOp on the stage's filesystem (root mount output 0) with its mounts; a CopyStep is
one FileOp with a copy action per source; a WorkdirStep makes its directory. Every feature is gated on
the daemon's LLB caps and declares the caps it uses, so an old BuildKit fails loudly instead of silently
dropping a field it does not know.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field

from lazybuild.registry.reference import Reference

from lazybuild.dockerfile.model import Build, Stage
from lazybuild.dockerfile.parser import DockerfileError
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.dockerfile.steps import (HEREDOC_FILE_MODE, PIPES_DIR, BindMount, CacheMount, CopyStep, RunStep,
                                        SecretMount, SshMount, TmpfsMount, WorkdirStep)
from .llb import builder
from .llb.builder import InputList, Output, Vertex
from .llb.proto import ops_pb2 as pb

CUSTOM_NAME = "llb.customname"
COMMAND = "com.docker.dockerfile.v1.command"
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
    context: Output | None = None  # a context given as an input or URL; else local://context
    named_contexts: dict[str, Output] = field(default_factory=dict)
    context_name: str = "context"


def normalize_image(ref: str) -> str:
    """`alpine` -> `docker.io/library/alpine:latest`, as BuildKit names image sources."""
    r = Reference.parse(ref)
    return str(r)


def _abs(p: str) -> str:
    return posixpath.normpath(posixpath.join("/", p))


def _user_opt(spec: str, input_index: int) -> pb.UserOpt:
    if spec.isdigit():
        return pb.UserOpt(byID=int(spec))
    if spec == "root":
        return pb.UserOpt(byID=0)
    return pb.UserOpt(byName=pb.NamedUserOpt(name=spec, input=input_index))


def chown_opt(spec: str, input_index: int) -> pb.ChownOpt | None:
    """`--chown=user[:group]` (names or ids); names are looked up in the destination's /etc/passwd."""
    if not spec:
        return None
    user, _, group = spec.partition(":")
    opt = pb.ChownOpt()
    opt.user.CopyFrom(_user_opt(user, input_index))
    if group:
        opt.group.CopyFrom(_user_opt(group, input_index))
    return opt


class Converter:
    def __init__(self, build: Build, caps, opts: BuildOptions, platforms: dict[int, pb.Platform],
                 lex: ShellLex, filename: str = "Dockerfile"):
        self.build, self.caps, self.opts, self.filename = build, caps, opts, filename
        self.platforms = platforms  # stage index -> platform
        self.lex = lex  # kept for callers; the model has expanded everything already
        self.states: dict[int, Output | None] = {}
        self.layers: dict[int, list[Output | None]] = {}  # stage index -> the state after each layer step
        self._context: Output | None = opts.context
        self._images: dict[tuple[str, str], Output] = {}

    # ---- errors and caps
    def fail(self, message: str, line: int) -> ConvertError:
        return ConvertError(message, line, line, self.filename)

    def need(self, cap: str, what: str, line: int) -> None:
        if not self.caps.has(cap):
            raise self.fail(f"{what} needs the BuildKit capability {cap!r}, which this daemon does not have "
                            "(upgrade BuildKit / Docker)", line)

    # ---- sources
    def image(self, ref: str, plat: pb.Platform) -> Output:
        name = normalize_image(ref)
        key = (name, plat.SerializeToString(deterministic=True).hex())
        if key not in self._images:
            attrs = {}
            caps = {"source.image"}
            if self.opts.image_resolve_mode != "default":
                attrs["image.resolvemode"] = self.opts.image_resolve_mode
                caps.add("source.image.resolvemode")
            self._images[key] = builder.source("docker-image://" + name, attrs, plat=plat, caps=caps,
                                               description={CUSTOM_NAME: f"FROM {name}"})
        return self._images[key]

    def context(self) -> Output:
        if self._context is None:
            attrs = {"local.session": self.opts.session_id, "local.sharedkeyhint": self.opts.context_name}
            caps = {"source.local", "source.local.sessionid", "source.local.sharedkeyhint"}
            if self.opts.excludes:
                attrs["local.excludepatterns"] = json.dumps(self.opts.excludes)
                caps.add("source.local.excludepatterns")
            follow = self._context_paths()
            if follow is not None:
                attrs["local.followpaths"] = json.dumps(follow)
                caps.add("source.local.followpaths")
            self._context = builder.source(f"local://{self.opts.context_name}", attrs, caps=caps,
                                           description={CUSTOM_NAME: "[internal] load build context"})
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

    def from_state(self, stage_index: int | None, ref: str) -> Output | None:
        """The state of `--from=` / `from=`: an earlier stage, a named context, or an image."""
        if stage_index is not None:
            return self.states[stage_index]
        if ref in self.opts.named_contexts:
            return self.opts.named_contexts[ref]
        if ref == "scratch":
            return None
        return self.image(ref, self.platforms[self._stage.index])

    def chain(self, index: int) -> list[Output | None]:
        """The states of stage INDEX from its root image: the base, then after each layer step."""
        st = next(s for s in self.build.stages if s.index == index)
        own = self.layers[index]
        if st.base_stage is not None:
            return self.chain(st.base_stage) + own[1:]
        return own

    # ---- stages
    def convert(self) -> dict[int, Output | None]:
        for st in self.build.stages:
            self._stage = st
            self.states[st.index] = self._convert_stage(st)
        return self.states

    def _base(self, st: Stage) -> Output | None:
        if st.base_stage is not None:
            return self.states[st.base_stage]
        if st.base in self.opts.named_contexts:
            return self.opts.named_contexts[st.base]
        if st.base == "scratch":
            return None
        return self.image(st.base, self.platforms[st.index])

    def _convert_stage(self, st: Stage) -> Output | None:
        state = self._base(st)
        steps = st.steps
        label = st.name or f"stage-{st.index}"
        self._ignore_cache = self.opts.no_cache is not None and (not self.opts.no_cache or st.name in self.opts.no_cache)
        layers: list[Output | None] = [state]
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

    def _vertex(self, op: pb.Op, inputs: InputList, caps: set[str], name: str, command: str = "") -> Output:
        op.constraints.SetInParent()
        desc = {CUSTOM_NAME: name}
        if command:
            desc[COMMAND] = command
        v = Vertex(op, list(inputs.outputs), desc, caps, ignore_cache=self._ignore_cache)
        return Output(v, 0)

    # ---- RUN
    def run(self, state: Output | None, step: RunStep, name: str) -> Output:
        line = step.line
        inputs = InputList()
        caps = {"exec.meta.base", "exec.mount.bind"}
        pipes = self._inline_files(step, inputs, caps)  # indexed first, as the op's bytes have always had it
        meta = pb.Meta(args=list(step.argv), env=list(step.env), cwd=step.cwd, user=step.user)
        if step.proxy_env:
            self.need("exec.meta.proxyenv", "proxy build args", line)
            caps.add("exec.meta.proxyenv")
            for p in step.proxy_env:
                setattr(meta.proxy_env, PROXY_FIELDS[p.key.upper()], p.value)
        for host, ip in self.opts.extra_hosts:
            meta.extraHosts.add(Host=host, IP=ip)
        op = pb.Op(exec=pb.ExecOp(meta=meta))
        op.platform.CopyFrom(self.platforms[self._stage.index])
        network = step.network if step.network != "default" else self.opts.force_network_mode or ""
        if network in ("host", "none"):
            self.need("exec.meta.network", f"RUN --network={network}", line)
            caps.add("exec.meta.network")
            op.exec.network = pb.HOST if network == "host" else pb.NONE
        if step.security == "insecure":
            self.need("exec.meta.security", "RUN --security=insecure", line)
            caps.add("exec.meta.security")
            op.exec.security = pb.INSECURE
        mounts = [pb.Mount(input=inputs.index(state), dest="/", output=0)]
        mounts += pipes
        mounts += self._run_mounts(step, inputs, caps)
        for m in sorted(mounts, key=lambda m: m.dest):
            op.exec.mounts.append(m)
        return self._vertex(op, inputs, caps, name, "RUN " + step.command)

    def _inline_files(self, step: RunStep, inputs: InputList, caps: set[str]) -> list[pb.Mount]:
        """A `#!` heredoc script: made by a FileOp and mounted read-only at /dev/pipes/."""
        if not step.inline_files:
            return []
        actions = [pb.FileAction(input=-1, secondaryInput=-1, output=0, mkfile=pb.FileActionMkFile(
            path="/" + f.name, mode=f.mode, data=f.data.encode(), timestamp=-1)) for f in step.inline_files]
        mk = pb.Op(file=pb.FileOp(actions=actions))
        mk.constraints.SetInParent()
        src = Output(Vertex(mk, [], {CUSTOM_NAME: "preparing inline document"}, {"file.base"}), 0)
        caps.add("exec.mount.selector")
        return [pb.Mount(input=inputs.index(src), selector="/", dest=PIPES_DIR + "/", output=-1, readonly=True)]

    def _run_mounts(self, step: RunStep, inputs: InputList, caps: set[str]) -> list[pb.Mount]:
        line = step.line
        out = []
        for m in step.mounts:
            match m:
                case BindMount():
                    mount = self._bind_mount(m, inputs, caps, line)
                case CacheMount():
                    mount = self._cache_mount(m, inputs, caps, line)
                case TmpfsMount():
                    self.need("exec.mount.tmpfs", "RUN --mount=type=tmpfs", line)
                    caps.add("exec.mount.tmpfs")
                    mount = pb.Mount(input=-1, dest=m.target, output=-1, mountType=pb.TMPFS)
                    if m.size_bytes:
                        self.need("exec.mount.tmpfs.size", "tmpfs size", line)
                        caps.add("exec.mount.tmpfs.size")
                        mount.TmpfsOpt.size = m.size_bytes
                case SecretMount():
                    self.need("exec.mount.secret", "RUN --mount=type=secret", line)
                    caps.add("exec.mount.secret")
                    if m.env:
                        raise self.fail("RUN --mount=type=secret,env= is not supported by this frontend yet", line)
                    mount = pb.Mount(input=-1, dest=m.target, output=-1, readonly=True, mountType=pb.SECRET)
                    mount.secretOpt.CopyFrom(pb.SecretOpt(ID=m.id, uid=m.uid, gid=m.gid, mode=m.mode,
                                                          optional=not m.required))
                case SshMount():
                    self.need("exec.mount.ssh", "RUN --mount=type=ssh", line)
                    caps.add("exec.mount.ssh")
                    mount = pb.Mount(input=-1, dest=m.target, output=-1, readonly=True, mountType=pb.SSH)
                    mount.SSHOpt.CopyFrom(pb.SSHOpt(ID=m.id, uid=m.uid, gid=m.gid, mode=m.mode,
                                                    optional=not m.required))
            out.append(mount)
        return out

    def _bind_mount(self, m: BindMount, inputs: InputList, caps: set[str], line: int) -> pb.Mount:
        own_context = m.from_stage is None and not m.from_image
        src = self.context() if own_context else self.from_state(m.from_stage, m.from_image)
        mount = pb.Mount(input=inputs.index(src), dest=m.target, output=-1, readonly=m.readonly, mountType=pb.BIND)
        if m.source != "/":
            mount.selector = m.source
            caps.add("exec.mount.selector")
        if not mount.readonly:
            self.need("exec.mount.bind.readwrite-nooutput", "RUN --mount=type=bind,rw", line)
            caps.add("exec.mount.bind.readwrite-nooutput")
        return mount

    def _cache_mount(self, m: CacheMount, inputs: InputList, caps: set[str], line: int) -> pb.Mount:
        self.need("exec.mount.cache", "RUN --mount=type=cache", line)
        caps.add("exec.mount.cache")
        mount = pb.Mount(input=-1, dest=m.target, output=-1, readonly=m.readonly, mountType=pb.CACHE)
        mount.cacheOpt.ID = self.opts.cache_ns + "/" + m.id
        if m.sharing != "shared":
            self.need("exec.mount.cache.sharing", "cache mount sharing", line)
            caps.add("exec.mount.cache.sharing")
        mount.cacheOpt.sharing = {"shared": pb.SHARED, "private": pb.PRIVATE, "locked": pb.LOCKED}[m.sharing]
        if m.from_stage is not None or m.from_image:
            mount.input = inputs.index(self.from_state(m.from_stage, m.from_image))
            if m.source != "/":
                mount.selector = m.source
                caps.add("exec.mount.selector")
        elif m.owned:
            # An owned cache directory starts from a made directory, as BuildKit's frontend does.
            owner = pb.ChownOpt()
            owner.user.byID = m.uid
            owner.group.byID = m.gid
            mk = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=-1, secondaryInput=-1, output=0,
                       mkdir=pb.FileActionMkDir(path="/cache", mode=m.mode, makeParents=True,
                                                owner=owner, timestamp=-1))]))
            mk.constraints.SetInParent()
            src = Output(Vertex(mk, [], {CUSTOM_NAME: "preparing cache mount"}, {"file.base"}), 0)
            mount.input = inputs.index(src)
            mount.selector = "/cache"
            caps.add("exec.mount.selector")
        return mount

    # ---- COPY / ADD
    def copy(self, state: Output | None, step: CopyStep, name: str) -> Output:
        line = step.line
        caps = {"file.base"}
        dest = step.dest
        mode = -1
        mode_str = ""
        if step.chmod:
            try:
                mode = int(step.chmod, 8)
            except ValueError:
                self.need("file.copy.modestring", f"--chmod={step.chmod} (not octal)", line)
                mode_str = step.chmod
        if step.exclude:
            self.need("file.copy.includeexcludepatterns", "--exclude", line)
            caps.add("file.copy.includeexcludepatterns")
        if step.parents:
            raise self.fail("COPY --parents is not supported by the lazybuild frontend yet", line)
        link = step.link and self.caps.has("mergeop") and not step.chmod
        base = None if link else state  # --link copies onto scratch and merges the result on top
        inputs = InputList()
        base_index = inputs.index(base)
        owner = chown_opt(step.chown, base_index)
        actions: list[pb.FileAction] = []

        def add(src_state: Output | None, src: str, attempt_unpack: bool, **extra) -> None:
            cp = pb.FileActionCopy(src=src, dest=dest, mode=mode, followSymlink=True, dirCopyContents=True,
                                   attemptUnpackDockerCompatibility=attempt_unpack, createDestPath=True,
                                   allowWildcard=True, allowEmptyWildcard=True, timestamp=-1, modeStr=mode_str,
                                   exclude_patterns=list(step.exclude))
            for k, v in extra.items():
                setattr(cp, k, v)
            if owner is not None:
                cp.owner.CopyFrom(owner)
            actions.append(pb.FileAction(input=base_index, secondaryInput=inputs.index(src_state), output=-1, copy=cp))

        if step.from_stage is not None or step.from_image:
            src_state = self.from_state(step.from_stage, step.from_image)
            for src in step.sources:
                add(src_state, _abs(src.text), False)
        else:
            for src in step.sources:
                match src.kind:
                    case "git":
                        add(self._git(src.text, step), "/", False)
                    case "url":
                        add(self._http(src.text, step), "/" + _url_filename(src.text), False)
                    case _:
                        add(self.context(), _abs(src.text), step.unpack)
        for doc in step.files:
            mk = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=-1, secondaryInput=-1, output=0, mkfile=pb.FileActionMkFile(
                path="/" + doc.name, mode=HEREDOC_FILE_MODE, data=doc.data.encode(), timestamp=-1))]))
            mk.constraints.SetInParent()
            # The mode is set by the copy, not the mkfile, so the daemon's umask cannot change it.
            add(Output(Vertex(mk, [], {CUSTOM_NAME: "preparing inline document"}, {"file.base"}), 0), "/" + doc.name,
                False, followSymlink=False, dirCopyContents=False, allowWildcard=False, allowEmptyWildcard=False,
                mode=doc.mode)
        if not actions:
            raise self.fail(f"{step.keyword} has no source", line)
        # Action j > 0 works on the result of action j-1, addressed past the op's inputs.
        for j in range(1, len(actions)):
            actions[j].input = len(inputs.outputs) + j - 1
        actions[-1].output = 0
        op = pb.Op(file=pb.FileOp(actions=actions))
        out = self._vertex(op, inputs, caps, name, step.keyword)
        if link:
            merge_inputs = InputList()
            mop = pb.Op(merge=pb.MergeOp(inputs=[pb.MergeInput(input=merge_inputs.index(state)) if state else
                                                 pb.MergeInput(input=merge_inputs.index(out))]))
            if state is not None:
                mop.merge.inputs.append(pb.MergeInput(input=merge_inputs.index(out)))
            return self._vertex(mop, merge_inputs, {"mergeop"}, name)
        return out

    def _http(self, url: str, step: CopyStep) -> Output:
        attrs = {"http.filename": _url_filename(url)}
        scaps = {"source.http"}
        if step.checksum:
            attrs["http.checksum"] = step.checksum
            self.need("source.http.checksum", "ADD --checksum", step.line)
            scaps.add("source.http.checksum")
        return builder.source(url, attrs, caps=scaps, description={CUSTOM_NAME: url})

    def _git(self, url: str, step: CopyStep) -> Output:
        self.need("source.git", "ADD of a git repository", step.line)
        remote, _, fragment = url.partition("#")
        ident = re.sub(r"^(https?|ssh|git)://", "", remote)
        ident = re.sub(r"^[^@/]+@([^:/]+):", r"\1/", ident)  # git@host:path -> host/path
        ident = "git://" + ident + (("#" + fragment) if fragment else "")
        attrs = {"git.fullurl": remote}
        scaps = {"source.git", "source.git.fullurl"}
        if ":" in fragment:
            self.need("source.git.subdir", "a git subdirectory (#ref:dir)", step.line)
            scaps.add("source.git.subdir")
        if step.keep_git_dir:
            attrs["git.keepgitdir"] = "true"
            scaps.add("source.git.keepgitdir")
        return builder.source(ident, attrs, caps=scaps, description={CUSTOM_NAME: url})

    # ---- WORKDIR
    def workdir(self, state: Output | None, step: WorkdirStep, name: str) -> Output:
        inputs = InputList()
        idx = inputs.index(state)
        mkdir = pb.FileActionMkDir(path=step.path, mode=0o755, makeParents=True, timestamp=-1)
        if step.user:
            mkdir.owner.CopyFrom(chown_opt(step.user, idx))
        op = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=idx, secondaryInput=-1, output=0, mkdir=mkdir)]))
        return self._vertex(op, inputs, {"file.base"}, name, "WORKDIR")


def _url_filename(url: str) -> str:
    path = url.split("?")[0].split("#")[0].rstrip("/")
    name = posixpath.basename(path.split("://", 1)[-1]) if "/" in path.split("://", 1)[-1] else ""
    return name or "__unnamed__"
