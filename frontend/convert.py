"""Dockerfile -> LLB: the stages of `lazybuild.dockerfile.model` become BuildKit ops.

Semantics follow BuildKit's dockerfile2llb: RUN is an ExecOp on the stage's filesystem (root mount
output 0) with its mounts; COPY/ADD are one FileOp with a copy action per source; WORKDIR makes its
directory; every other instruction only changes the image config. Every feature is gated on the
daemon's LLB caps and declares the caps it uses, so an old BuildKit fails loudly instead of silently
dropping a field it does not know.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field

from lazybuild.registry.reference import Reference

from lazybuild.dockerfile.model import HEREDOC_MARKER, Build, Stage
from lazybuild.dockerfile.parser import DockerfileError
from lazybuild.dockerfile.shell import ShellLex
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


def _clean(p: str) -> str:
    return posixpath.normpath(p) if p else p


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
        self.lex = lex
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
            for ins in st.instructions:
                if ins["instruction"] in ("COPY", "ADD") and "from" not in ins:
                    for src in ins["sources"]:
                        if not _is_url(src) and not _is_git(src):
                            paths.add(_abs(src))
                if ins["instruction"] == "RUN":
                    for m in ins.get("mounts", []):
                        if m["type"] == "bind" and "from" not in m:
                            paths.add(_abs(m.get("source", "/")))
        if "/" in paths:
            return None
        return sorted(p.lstrip("/") for p in paths)

    def from_ref(self, ref: str, stage_index: int | None, line: int) -> Output | None:
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
        steps = [i for i in st.instructions if i["instruction"] in ("RUN", "COPY", "ADD", "WORKDIR")]
        label = st.name or f"stage-{st.index}"
        self._ignore_cache = self.opts.no_cache is not None and (not self.opts.no_cache or st.name in self.opts.no_cache)
        layers: list[Output | None] = [state]
        n = 0
        for ins in st.instructions:
            kind = ins["instruction"]
            if kind not in ("RUN", "COPY", "ADD", "WORKDIR"):
                continue
            n += 1
            name = f"[{label} {n}/{len(steps)}] {ins['text']}"
            if kind == "RUN":
                state = self.run(state, ins, name)
            elif kind in ("COPY", "ADD"):
                state = self.copy(state, ins, name)
            elif kind == "WORKDIR" and ins["path"] != "/":
                state = self.workdir(state, ins, name)
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
    def run(self, state: Output | None, ins: dict, name: str) -> Output:
        line = ins["line"]
        inputs = InputList()
        caps = {"exec.meta.base", "exec.mount.bind"}
        meta = pb.Meta(args=self._run_args(ins, inputs, caps), env=ins["env"], cwd=ins["workdir"] or "/",
                       user=ins["user"])
        if ins.get("proxyEnv"):
            self.need("exec.meta.proxyenv", "proxy build args", line)
            caps.add("exec.meta.proxyenv")
            for k, v in ins["proxyEnv"].items():
                setattr(meta.proxy_env, PROXY_FIELDS[k.upper()], v)
        for host, ip in self.opts.extra_hosts:
            meta.extraHosts.add(Host=host, IP=ip)
        op = pb.Op(exec=pb.ExecOp(meta=meta))
        op.platform.CopyFrom(self.platforms[self._stage.index])
        network = self.opts.force_network_mode or ""
        network = ins.get("network", network) if ins.get("network") not in (None, "default") else network
        if network in ("host", "none"):
            self.need("exec.meta.network", f"RUN --network={network}", line)
            caps.add("exec.meta.network")
            op.exec.network = pb.HOST if network == "host" else pb.NONE
        if ins.get("security") == "insecure":
            self.need("exec.meta.security", "RUN --security=insecure", line)
            caps.add("exec.meta.security")
            op.exec.security = pb.INSECURE
        mounts = [pb.Mount(input=inputs.index(state), dest="/", output=0)]
        mounts += self._run_mounts(ins, inputs, caps, op.exec.meta, self._pending_mounts)
        for m in sorted(mounts, key=lambda m: m.dest):
            op.exec.mounts.append(m)
        return self._vertex(op, inputs, caps, name, "RUN " + " ".join(ins["cmd"][-1:]))

    def _run_args(self, ins: dict, inputs: InputList, caps: set[str]) -> list[str]:
        args = list(ins["cmd"])
        self._pending_mounts: list[pb.Mount] = []
        files = ins.get("files") or []
        if not files:
            return args
        if not ins["shellForm"]:
            raise self.fail("heredocs are only supported in the shell form of RUN", ins["line"])
        shell, script = args[:-1], args[-1]
        marker = HEREDOC_MARKER.match(script.strip())
        if marker and len(files) >= 1 and marker.group(3) == files[0]["name"]:
            doc = files[0]
            data = _chomp(doc["data"]) if doc["chomp"] else doc["data"]
            if data.startswith("#!"):
                # A script with its own interpreter runs as a file, mounted read-only at /dev/pipes/.
                mk = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=-1, secondaryInput=-1, output=0, mkfile=pb.FileActionMkFile(
                    path="/" + doc["name"], mode=0o755, data=data.encode(), timestamp=-1))]))
                mk.constraints.SetInParent()
                src = Output(Vertex(mk, [], {CUSTOM_NAME: "preparing inline document"}, {"file.base"}), 0)
                self._pending_mounts.append(pb.Mount(input=inputs.index(src), selector="/", dest="/dev/pipes/",
                                                     output=-1, readonly=True))
                caps.add("exec.mount.selector")
                return ["/dev/pipes/" + doc["name"]]
            return shell + [data]
        full = script
        for doc in files:
            full += "\n" + doc["data"] + doc["name"]
        return shell + [full]

    def _run_mounts(self, ins: dict, inputs: InputList, caps: set[str], meta: pb.Meta,
                    pending: list[pb.Mount]) -> list[pb.Mount]:
        line = ins["line"]
        out = list(pending)
        ssh_count = 0
        for m in ins.get("mounts", []):
            kind = m["type"]
            target = m.get("target", "")
            if target and not target.startswith("/"):
                target = _abs(posixpath.join(ins["workdir"] or "/", target))
            elif target:
                target = _clean(target)
            if kind == "bind":
                src = self.context() if "from" not in m else self.from_ref(m["from"], m.get("fromStage"), line)
                mount = pb.Mount(input=inputs.index(src), dest=target, output=-1,
                                 readonly=m.get("readonly", True), mountType=pb.BIND)
                if m.get("source"):
                    mount.selector = _abs(m["source"])
                    caps.add("exec.mount.selector")
                if not mount.readonly:
                    self.need("exec.mount.bind.readwrite-nooutput", "RUN --mount=type=bind,rw", line)
                    caps.add("exec.mount.bind.readwrite-nooutput")
            elif kind == "cache":
                self.need("exec.mount.cache", "RUN --mount=type=cache", line)
                caps.add("exec.mount.cache")
                cache_id = m.get("id") or target
                mount = pb.Mount(input=-1, dest=target, output=-1, readonly=m.get("readonly", False),
                                 mountType=pb.CACHE)
                mount.cacheOpt.ID = self.opts.cache_ns + "/" + cache_id
                sharing = m.get("sharing", "shared")
                if sharing != "shared":
                    self.need("exec.mount.cache.sharing", "cache mount sharing", line)
                    caps.add("exec.mount.cache.sharing")
                mount.cacheOpt.sharing = {"shared": pb.SHARED, "private": pb.PRIVATE, "locked": pb.LOCKED}[sharing]
                if "from" in m:
                    src = self.from_ref(m["from"], m.get("fromStage"), line)
                    mount.input = inputs.index(src)
                    if m.get("source"):
                        mount.selector = _abs(m["source"])
                        caps.add("exec.mount.selector")
                elif any(k in m for k in ("uid", "gid", "mode")):
                    # An owned cache directory starts from a made directory, as BuildKit's frontend does.
                    owner = pb.ChownOpt()
                    owner.user.byID = m.get("uid", 0)
                    owner.group.byID = m.get("gid", 0)
                    mk = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=-1, secondaryInput=-1, output=0,
                               mkdir=pb.FileActionMkDir(path="/cache", mode=m.get("mode", 0o755), makeParents=True,
                                                        owner=owner, timestamp=-1))]))
                    mk.constraints.SetInParent()
                    src = Output(Vertex(mk, [], {CUSTOM_NAME: "preparing cache mount"}, {"file.base"}), 0)
                    mount.input = inputs.index(src)
                    mount.selector = "/cache"
                    caps.add("exec.mount.selector")
            elif kind == "tmpfs":
                self.need("exec.mount.tmpfs", "RUN --mount=type=tmpfs", line)
                caps.add("exec.mount.tmpfs")
                mount = pb.Mount(input=-1, dest=target, output=-1, mountType=pb.TMPFS)
                if m.get("size"):
                    self.need("exec.mount.tmpfs.size", "tmpfs size", line)
                    caps.add("exec.mount.tmpfs.size")
                    mount.TmpfsOpt.size = _parse_size(m["size"], line, self)
            elif kind == "secret":
                self.need("exec.mount.secret", "RUN --mount=type=secret", line)
                caps.add("exec.mount.secret")
                secret_id = m.get("id") or posixpath.basename(target)
                if "env" in m:
                    raise self.fail("RUN --mount=type=secret,env= is not supported by this frontend yet", line)
                target = target or "/run/secrets/" + secret_id
                mount = pb.Mount(input=-1, dest=target, output=-1, readonly=True, mountType=pb.SECRET)
                mount.secretOpt.CopyFrom(pb.SecretOpt(ID=secret_id, uid=m.get("uid", 0), gid=m.get("gid", 0),
                                                      mode=m.get("mode", 0o400), optional=not m.get("required", False)))
            elif kind == "ssh":
                self.need("exec.mount.ssh", "RUN --mount=type=ssh", line)
                caps.add("exec.mount.ssh")
                target = target or f"/run/buildkit/ssh_agent.{ssh_count}"
                mount = pb.Mount(input=-1, dest=target, output=-1, readonly=True, mountType=pb.SSH)
                mount.SSHOpt.CopyFrom(pb.SSHOpt(ID=m.get("id", "") or "default", uid=m.get("uid", 0),
                                                gid=m.get("gid", 0), mode=m.get("mode", 0o600),
                                                optional=not m.get("required", False)))
                if ssh_count == 0 and not any(e.startswith("SSH_AUTH_SOCK=") for e in meta.env):
                    meta.env.append("SSH_AUTH_SOCK=" + target)
                ssh_count += 1
            else:
                raise self.fail(f"unsupported mount type {kind!r}", line)
            out.append(mount)
        return out

    # ---- COPY / ADD
    def copy(self, state: Output | None, ins: dict, name: str) -> Output:
        line = ins["line"]
        is_add = ins["instruction"] == "ADD"
        caps = {"file.base"}
        workdir = ins.get("workdir") or "/"
        raw_dest = ins["dest"]
        dest = _abs(posixpath.join(workdir, raw_dest))
        if raw_dest in (".", "") or raw_dest.endswith("/"):
            dest = dest.rstrip("/") + "/"
        mode = -1
        mode_str = ""
        if ins.get("chmod"):
            try:
                mode = int(ins["chmod"], 8)
            except ValueError:
                self.need("file.copy.modestring", f"--chmod={ins['chmod']} (not octal)", line)
                mode_str = ins["chmod"]
        if ins.get("exclude"):
            self.need("file.copy.includeexcludepatterns", "--exclude", line)
            caps.add("file.copy.includeexcludepatterns")
        if ins.get("parents"):
            raise self.fail("COPY --parents is not supported by the lazybuild frontend yet", line)
        link = bool(ins.get("link")) and self.caps.has("mergeop") and not ins.get("chmod")
        base = None if link else state  # --link copies onto scratch and merges the result on top
        inputs = InputList()
        base_index = inputs.index(base)
        owner = chown_opt(ins.get("chown", ""), base_index)
        actions: list[pb.FileAction] = []

        def add(src_state: Output | None, src: str, attempt_unpack: bool, **extra) -> None:
            cp = pb.FileActionCopy(src=src, dest=dest, mode=mode, followSymlink=True, dirCopyContents=True,
                                   attemptUnpackDockerCompatibility=attempt_unpack, createDestPath=True,
                                   allowWildcard=True, allowEmptyWildcard=True, timestamp=-1, modeStr=mode_str,
                                   exclude_patterns=ins.get("exclude", []))
            for k, v in extra.items():
                setattr(cp, k, v)
            if owner is not None:
                cp.owner.CopyFrom(owner)
            actions.append(pb.FileAction(input=base_index, secondaryInput=inputs.index(src_state), output=-1, copy=cp))

        if "from" in ins:
            src_state = self.from_ref(ins["from"], ins.get("fromStage"), line)
            for src in ins["sources"]:
                add(src_state, _abs(src), False)
        else:
            for src in ins["sources"]:
                if _is_git(src):
                    if not is_add:
                        raise self.fail(f"source can't be a git reference for COPY: {src}", line)
                    add(self._git(src, ins), "/", False)
                elif _is_url(src):
                    if not is_add:
                        raise self.fail(f"source can't be a URL for COPY: {src}", line)
                    add(self._http(src, ins), "/" + _url_filename(src), False)
                else:
                    add(self.context(), _abs(src), is_add and ins.get("unpack", True) is not False)
        for doc in ins.get("files") or []:
            mk = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=-1, secondaryInput=-1, output=0, mkfile=pb.FileActionMkFile(
                path="/" + doc["name"], mode=0o664, data=doc["data"].encode(), timestamp=-1))]))
            mk.constraints.SetInParent()
            # The mode is set by the copy, not the mkfile, so the daemon's umask cannot change it.
            add(Output(Vertex(mk, [], {CUSTOM_NAME: "preparing inline document"}, {"file.base"}), 0), "/" + doc["name"],
                False, followSymlink=False, dirCopyContents=False, allowWildcard=False, allowEmptyWildcard=False,
                mode=mode if mode != -1 else 0o664)
        if not actions:
            raise self.fail(f"{ins['instruction']} has no source", line)
        # Action j > 0 works on the result of action j-1, addressed past the op's inputs.
        for j in range(1, len(actions)):
            actions[j].input = len(inputs.outputs) + j - 1
        actions[-1].output = 0
        op = pb.Op(file=pb.FileOp(actions=actions))
        out = self._vertex(op, inputs, caps, name, ins["instruction"])
        if link:
            merge_inputs = InputList()
            mop = pb.Op(merge=pb.MergeOp(inputs=[pb.MergeInput(input=merge_inputs.index(state)) if state else
                                                 pb.MergeInput(input=merge_inputs.index(out))]))
            if state is not None:
                mop.merge.inputs.append(pb.MergeInput(input=merge_inputs.index(out)))
            return self._vertex(mop, merge_inputs, {"mergeop"}, name)
        return out

    def _http(self, url: str, ins: dict) -> Output:
        attrs = {"http.filename": _url_filename(url)}
        scaps = {"source.http"}
        if ins.get("checksum"):
            attrs["http.checksum"] = ins["checksum"]
            self.need("source.http.checksum", "ADD --checksum", ins["line"])
            scaps.add("source.http.checksum")
        return builder.source(url, attrs, caps=scaps, description={CUSTOM_NAME: url})

    def _git(self, url: str, ins: dict) -> Output:
        self.need("source.git", "ADD of a git repository", ins["line"])
        remote, _, fragment = url.partition("#")
        ident = re.sub(r"^(https?|ssh|git)://", "", remote)
        ident = re.sub(r"^[^@/]+@([^:/]+):", r"\1/", ident)  # git@host:path -> host/path
        ident = "git://" + ident + (("#" + fragment) if fragment else "")
        attrs = {"git.fullurl": remote}
        scaps = {"source.git", "source.git.fullurl"}
        if ":" in fragment:
            self.need("source.git.subdir", "a git subdirectory (#ref:dir)", ins["line"])
            scaps.add("source.git.subdir")
        if ins.get("keep-git-dir"):
            attrs["git.keepgitdir"] = "true"
            scaps.add("source.git.keepgitdir")
        return builder.source(ident, attrs, caps=scaps, description={CUSTOM_NAME: url})

    # ---- WORKDIR
    def workdir(self, state: Output | None, ins: dict, name: str) -> Output:
        inputs = InputList()
        idx = inputs.index(state)
        mkdir = pb.FileActionMkDir(path=ins["path"], mode=0o755, makeParents=True, timestamp=-1)
        if ins.get("user"):
            mkdir.owner.CopyFrom(chown_opt(ins["user"], idx))
        op = pb.Op(file=pb.FileOp(actions=[pb.FileAction(input=idx, secondaryInput=-1, output=0, mkdir=mkdir)]))
        return self._vertex(op, inputs, {"file.base"}, name, "WORKDIR")


def _chomp(data: str) -> str:
    return "\n".join(line.lstrip("\t") for line in data.split("\n"))


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


def _is_git(src: str) -> bool:
    if src.startswith("git@") or src.startswith("git://"):
        return True
    return _is_url(src) and (src.split("#")[0].endswith(".git"))


def _url_filename(url: str) -> str:
    path = url.split("?")[0].split("#")[0].rstrip("/")
    name = posixpath.basename(path.split("://", 1)[-1]) if "/" in path.split("://", 1)[-1] else ""
    return name or "__unnamed__"


def _parse_size(value: str, line: int, conv: Converter) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)i?b?", value.strip().lower())
    if not m:
        raise conv.fail(f"invalid tmpfs size {value!r}", line)
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)]
