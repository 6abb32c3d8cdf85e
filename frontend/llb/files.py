"""The actions of a file op (`State.file`): make a file or a directory, remove, copy from another state.

proto3 traps, written explicitly: a copy's mode -1 keeps the source's modes (0 would chmod 000), and
timestamp -1 keeps the files' times (0 would set them to 1970).
"""

from __future__ import annotations

from dataclasses import dataclass

from .proto import ops_pb2 as pb
from .state import State

NO_TIME = -1


@dataclass(frozen=True)
class Chown:
    """An owner by id or by name; names are looked up in the /etc/passwd and /etc/group of the file
    op's base state."""

    user: int | str
    group: int | str | None = None

    def marshal(self, base: int) -> pb.ChownOpt:
        opt = pb.ChownOpt(user=_user(self.user, base))
        if self.group is not None:
            opt.group.CopyFrom(_user(self.group, base))
        return opt


def _user(who: int | str, base: int) -> pb.UserOpt:
    if isinstance(who, int):
        return pb.UserOpt(byID=who)
    return pb.UserOpt(byName=pb.NamedUserOpt(name=who, input=base))


@dataclass(frozen=True)
class Mkfile:
    path: str
    data: bytes
    mode: int = 0o644
    owner: Chown | None = None
    source = State()  # reads no second state

    def marshal(self, own_input: int, secondary: int, output: int, base: int, caps: set[str]) -> pb.FileAction:
        mkfile = pb.FileActionMkFile(path=self.path, mode=self.mode, data=self.data, timestamp=NO_TIME)
        if self.owner is not None:
            mkfile.owner.CopyFrom(self.owner.marshal(base))
        return pb.FileAction(input=own_input, secondaryInput=secondary, output=output, mkfile=mkfile)


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    make_parents: bool = False
    owner: Chown | None = None
    source = State()

    def marshal(self, own_input: int, secondary: int, output: int, base: int, caps: set[str]) -> pb.FileAction:
        mkdir = pb.FileActionMkDir(path=self.path, mode=self.mode, makeParents=self.make_parents, timestamp=NO_TIME)
        if self.owner is not None:
            mkdir.owner.CopyFrom(self.owner.marshal(base))
        return pb.FileAction(input=own_input, secondaryInput=secondary, output=output, mkdir=mkdir)


@dataclass(frozen=True)
class Rm:
    path: str
    allow_not_found: bool = False
    allow_wildcard: bool = False
    source = State()

    def marshal(self, own_input: int, secondary: int, output: int, base: int, caps: set[str]) -> pb.FileAction:
        if self.allow_wildcard:
            caps.add("file.rm.wildcard")
        rm = pb.FileActionRm(path=self.path, allowNotFound=self.allow_not_found, allowWildcard=self.allow_wildcard)
        return pb.FileAction(input=own_input, secondaryInput=secondary, output=output, rm=rm)


@dataclass(frozen=True)
class Copy:
    """`src` of `source` to `dest`. The flags are BuildKit's CopyInfo; all off unless asked for."""

    source: State
    src: str
    dest: str
    mode: int | None = None  # None: keep the source's modes
    mode_str: str = ""  # a chmod-style mode (u+x), when not octal
    owner: Chown | None = None
    follow_symlinks: bool = False
    copy_dir_contents: bool = False
    unpack_archive: bool = False
    create_dest_path: bool = False
    allow_wildcard: bool = False
    allow_empty_wildcard: bool = False
    exclude: tuple[str, ...] = ()

    def marshal(self, own_input: int, secondary: int, output: int, base: int, caps: set[str]) -> pb.FileAction:
        copy = pb.FileActionCopy(
            src=self.src, dest=self.dest, mode=-1 if self.mode is None else self.mode, followSymlink=self.follow_symlinks,
            dirCopyContents=self.copy_dir_contents, attemptUnpackDockerCompatibility=self.unpack_archive,
            createDestPath=self.create_dest_path, allowWildcard=self.allow_wildcard,
            allowEmptyWildcard=self.allow_empty_wildcard, timestamp=NO_TIME, modeStr=self.mode_str,
            exclude_patterns=self.exclude)
        if self.mode_str:
            caps.add("file.copy.modestring")
        if self.exclude:
            caps.add("file.copy.includeexcludepatterns")
        if self.owner is not None:
            copy.owner.CopyFrom(self.owner.marshal(base))
        return pb.FileAction(input=own_input, secondaryInput=secondary, output=output, copy=copy)


FileAction = Mkfile | Mkdir | Rm | Copy
