"""Resolved steps: the filesystem changes of a stage, with every Dockerfile rule already applied.

A step is what a back end executes: the LLB converter (frontend/convert.py) and the daemonless builder
(builder/executor.py) translate steps and nothing else. Heredocs become argv and inline files here, mount
defaults are filled here, COPY destinations are joined with WORKDIR here, and `step_for` is the one place
that decides which instructions change the filesystem (RUN, COPY, ADD, and WORKDIR of anything but `/`,
as BuildKit's dockerfile2llb does).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from .instructions import Add, Copy, FileCopy, Heredoc, Instruction, KeyValue, MountSpec, Run, Workdir

# A `#!` heredoc script runs as a file, mounted read-only here (BuildKit's path for it).
PIPES_DIR = "/dev/pipes"
# A RUN whose script is only `<<NAME` (or `<<-NAME`, quoted or not): the heredoc is the script itself.
_HEREDOC_SCRIPT = re.compile(r"^<<(-?)\s*(['\"]?)([^'\"\s]+)\2$")
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)i?b?")
HEREDOC_FILE_MODE = 0o664  # a COPY heredoc's mode without --chmod, as BuildKit writes it
SCRIPT_MODE = 0o755


@dataclass(frozen=True)
class Context:
    """What an instruction sees of its stage: the state left by the instructions before it."""

    env: tuple[str, ...]  # KEY=VALUE as RUN sees them: the ARGs in scope, then ENV over them
    workdir: str  # absolute
    user: str  # "" for the image's default
    shell: tuple[str, ...]
    proxy_env: tuple[KeyValue, ...]  # proxy build args: RUN's environment only, never the image


@dataclass(frozen=True)
class CopySource:
    """One source of COPY/ADD: a path (in the build context, a stage or an image), a URL or a git repository
    (ADD only)."""

    text: str
    kind: str  # path | url | git


@dataclass(frozen=True)
class InlineFile:
    """A file whose contents the Dockerfile holds (a heredoc), ready to be written."""

    name: str
    data: str
    mode: int


# ---- mounts, every default filled


@dataclass(frozen=True)
class BindMount:
    target: str  # absolute
    source: str  # absolute path inside what is mounted ("/": all of it)
    from_stage: int | None  # an earlier stage, or
    from_image: str  # an image or named context; "" (and no stage): the build context
    readonly: bool


@dataclass(frozen=True)
class CacheMount:
    target: str
    id: str  # the target when not written
    sharing: str  # shared | private | locked
    readonly: bool
    from_stage: int | None  # a stage or image the cache starts from, if any
    from_image: str
    source: str  # inside from_stage/from_image
    uid: int
    gid: int
    mode: int
    owned: bool  # uid, gid or mode were written: the cache starts as a directory made with them


@dataclass(frozen=True)
class TmpfsMount:
    target: str
    size_bytes: int  # 0: the kernel's default


@dataclass(frozen=True)
class SecretMount:
    target: str  # "" when the secret goes to an environment variable only
    id: str
    env: str  # the variable to set, "" for none
    required: bool
    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class SshMount:
    target: str
    id: str
    required: bool
    uid: int
    gid: int
    mode: int


Mount = BindMount | CacheMount | TmpfsMount | SecretMount | SshMount


# ---- steps


@dataclass(frozen=True)
class RunStep:
    line: int
    text: str  # the instruction on one line
    command: str  # the command as written, for progress output (the last word of the written argv)
    argv: tuple[str, ...]  # heredocs applied
    inline_files: tuple[InlineFile, ...]  # mounted read-only at PIPES_DIR
    mounts: tuple[Mount, ...]
    env: tuple[str, ...]
    proxy_env: tuple[KeyValue, ...]
    cwd: str
    user: str
    network: str  # default | none | host
    security: str  # sandbox | insecure


@dataclass(frozen=True)
class CopyStep:
    line: int
    text: str
    keyword: str  # COPY | ADD
    sources: tuple[CopySource, ...]
    dest: str  # absolute; ends with "/" when it names a directory
    files: tuple[InlineFile, ...]  # heredocs, expanded and chomped
    from_stage: int | None
    from_image: str  # COPY --from= an image or named context; "" (and no stage): the build context
    chown: str
    chmod: str
    link: bool
    exclude: tuple[str, ...]
    parents: bool
    unpack: bool  # ADD: local archives are unpacked
    checksum: str  # ADD of a URL: its expected digest
    keep_git_dir: bool

    @property
    def is_add(self) -> bool:
        return self.keyword == "ADD"


@dataclass(frozen=True)
class WorkdirStep:
    line: int
    text: str
    path: str  # absolute
    user: str  # the directory is made as this user


Step = RunStep | CopyStep | WorkdirStep


def step_for(ins: Instruction, ctx: Context) -> Step | None:
    """The step an expanded instruction makes, or None when it only changes the image config."""
    match ins:
        case Run():
            return run_step(ins, ctx)
        case Copy() | Add():
            return copy_step(ins, ctx)
        case Workdir() if ins.path != "/":
            return WorkdirStep(ins.line, ins.text, ins.path, ctx.user)
    return None


def run_step(ins: Run, ctx: Context) -> RunStep:
    written = ins.command.argv(ctx.shell)
    argv, inline_files = _heredoc_argv(ins, written)
    mounts = tuple(_mount(m, ctx.workdir) for m in ins.mounts)
    env = ctx.env
    ssh = next((m for m in mounts if isinstance(m, SshMount)), None)
    if ssh is not None and not any(e.startswith("SSH_AUTH_SOCK=") for e in env):
        env = env + ("SSH_AUTH_SOCK=" + ssh.target,)  # the first agent is the default one, as in BuildKit
    return RunStep(ins.line, ins.text, written[-1] if written else "", argv, inline_files, mounts, env, ctx.proxy_env,
                   ctx.workdir, ctx.user, ins.network or "default", ins.security or "sandbox")


def _heredoc_argv(ins: Run, written: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[InlineFile, ...]]:
    """RUN's argv with its heredocs applied (BuildKit's dispatchRun)."""
    docs = ins.heredocs
    if not docs:
        return written, ()
    if ins.command.exec_form:
        raise ValueError("heredocs are only supported in the shell form of RUN")
    shell, script = written[:-1], written[-1]
    marker = _HEREDOC_SCRIPT.match(script.strip())
    if marker and marker.group(3) == docs[0].name:
        # `RUN <<EOF`: the document is the script. Its `<<-` tabs go here; nothing else expands it.
        doc = docs[0]
        data = chomp(doc.data) if doc.chomp else doc.data
        if data.startswith("#!"):  # a script with its own interpreter runs as a file
            if "/" in doc.name or doc.name in (".", ".."):
                raise ValueError(f"heredoc name {doc.name!r} is not a file name")
            return (f"{PIPES_DIR}/{doc.name}",), (InlineFile(doc.name, data, SCRIPT_MODE),)
        return shell + (data,), ()
    # Documents fed to a command: the shell reads them (and strips `<<-` tabs) from the script itself.
    full = script + "".join("\n" + doc.data + doc.name for doc in docs)
    return shell + (full,), ()


def chomp(data: str) -> str:
    """`<<-`: leading tabs go from every line."""
    return "\n".join(line.lstrip("\t") for line in data.split("\n"))


def _abs(path: str) -> str:
    return posixpath.normpath(posixpath.join("/", path))


def _mount(m: MountSpec, workdir: str) -> Mount:
    target = m.target or ""
    if target:
        target = _abs(posixpath.join(workdir, target))  # relative targets are inside the working directory
    match m.type:
        case "bind":
            return BindMount(target, _abs(m.source or "/"), m.from_stage, _image(m), bool(m.readonly))
        case "cache":
            return CacheMount(target, m.id or target, m.sharing or "shared", bool(m.readonly), m.from_stage,
                              _image(m), _abs(m.source or "/"), m.uid or 0, m.gid or 0,
                              0o755 if m.mode is None else m.mode,
                              owned=any(v is not None for v in (m.uid, m.gid, m.mode)))
        case "tmpfs":
            return TmpfsMount(target, parse_size(m.size) if m.size else 0)
        case "secret":
            return SecretMount(target, m.id or posixpath.basename(target), m.env or "", bool(m.required),
                               m.uid or 0, m.gid or 0, 0o400 if m.mode is None else m.mode)
        case "ssh":
            return SshMount(target, m.id or "default", bool(m.required), m.uid or 0, m.gid or 0,
                            0o600 if m.mode is None else m.mode)
    raise ValueError(f"unsupported mount type {m.type!r}")


def _image(m: MountSpec) -> str:
    return (m.from_ or "") if m.from_stage is None else ""


def parse_size(value: str) -> int:
    """A tmpfs size (`64m`, `1g`, `512kib`, bytes) -> bytes."""
    m = _SIZE.fullmatch(value.strip().lower())
    if not m:
        raise ValueError(f"invalid tmpfs size {value!r}: want bytes or a number with k, m, g or t")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)]


def copy_dest(workdir: str, dest: str) -> str:
    """COPY's destination joined with WORKDIR; a trailing `/` (or `.`) keeps meaning "into this directory"."""
    path = _abs(posixpath.join(workdir, dest))
    if dest in (".", "") or dest.endswith("/"):
        path = path.rstrip("/") + "/"
    return path


def copy_step(ins: FileCopy, ctx: Context) -> CopyStep:
    mode = int(ins.chmod, 8) if ins.chmod and _is_octal(ins.chmod) else HEREDOC_FILE_MODE
    files = tuple(InlineFile(h.name, h.data, mode) for h in ins.heredocs)
    is_copy = isinstance(ins, Copy)
    if is_copy and ins.from_ is not None:
        sources = tuple(CopySource(s, "path") for s in ins.sources)  # paths in that stage or image
    else:
        sources = tuple(_source(s, is_copy) for s in ins.sources)
    return CopyStep(
        ins.line, ins.text, ins.keyword, sources, copy_dest(ctx.workdir, ins.dest), files,
        from_stage=ins.from_stage if is_copy else None,
        from_image=(ins.from_ or "") if is_copy and ins.from_stage is None else "",
        chown=ins.chown or "", chmod=ins.chmod or "", link=bool(ins.link), exclude=ins.exclude or (),
        parents=bool(ins.parents) if is_copy else False,
        unpack=not is_copy and ins.unpack is not False,
        checksum="" if is_copy else ins.checksum or "",
        keep_git_dir=False if is_copy else bool(ins.keep_git_dir))


def _source(text: str, is_copy: bool) -> CopySource:
    if text.startswith(("git@", "git://")) or (_is_url(text) and text.split("#")[0].endswith(".git")):
        if is_copy:
            raise ValueError(f"source can't be a git reference for COPY: {text}")
        return CopySource(text, "git")
    if _is_url(text):
        if is_copy:
            raise ValueError(f"source can't be a URL for COPY: {text}")
        return CopySource(text, "url")
    return CopySource(text, "path")


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _is_octal(text: str) -> bool:
    try:
        int(text, 8)
    except ValueError:
        return False
    return True


def expanded_heredoc(doc: Heredoc, expand) -> Heredoc:
    """A COPY/ADD heredoc as it is written to the file: `<<-` tabs gone, then expanded unless its name was
    quoted (EXPAND gives the expanded text)."""
    data = chomp(doc.data) if doc.chomp else doc.data
    if doc.expand:
        data = expand(data)
    return Heredoc(doc.name, data, chomp=False, expand=False)
