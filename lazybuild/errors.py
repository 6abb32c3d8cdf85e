"""The errors lazybuild raises for people: one base, one class per area, each with an exit code and a hint.

The command line (`lazybuild.cli.main`) is the one place that turns them into words: it prints
`lazybuild: error: MESSAGE` and `lazybuild: hint: HINT`, and exits with the class's `exit_code`. Any
other exception is a bug in lazybuild and keeps its traceback, so it can be reported.

Each module keeps its own specific classes (`estargz.ChunkDigestMismatch`, `registry.RegistryError`,
`dockerfile.parser.DockerfileError`, ...), which stand on the areas below:

| area            | exit | what went wrong                                        | its classes                                 |
|-----------------|------|--------------------------------------------------------|---------------------------------------------|
| UsageError      | 2    | the command line: flags that do not fit together       | the CLI, `lazybuild build`'s flags          |
| InputError      | 1    | a value or file given: reference, platform, digest,    | InvalidDigest, snapshotter ConfigError and  |
|                 |      | config file, snapshot label                            | LabelError                                  |
|  BadDockerfile  | 1    | a Dockerfile lazybuild (and BuildKit) cannot build     | DockerfileError, ShellError, ConvertError   |
| DataError       | 1    | bytes that are not what their format or digest says:   | EStargzError (all of `lazybuild.estargz`),  |
|                 |      | layers, OCI layouts, docker-archives, image documents  | LayoutError, TransferError, UnsafePath      |
| RemoteError     | 3    | a registry, containerd or BuildKit refused or was gone | RegistryError, RegistryAuthError, BodyError,|
|                 |      |                                                        | PullError, GatewayError, Unsupported        |
| BuildFailure    | 4    | a build step failed, or its export                     | BuildError, CopyError, RunError, ExportError|
| HostError       | 5    | this machine lacks something: FUSE, overlayfs, rights  | OverlayError                                |
| MountError      | 5    | a lazy mount could not be made or served               | mounter LayerError                          |
| SnapshotterError| 5    | the containerd snapshotter could not do what was asked | snapshotter SnapshotError                   |
| MissingExtra    | 5    | an optional dependency is not installed                | (`pip install 'lazybuild[mount]'`)          |

Beside them the command line exits 1 for a file the system refused (OSError: no such file, permission
denied) and 130 when interrupted (Ctrl-C, SIGTERM during a build).

InputError is also a ValueError: the parsers reported bad values with ValueError before this
hierarchy existed, and code that catches ValueError around them keeps working.
"""

from __future__ import annotations

import importlib


class LazybuildError(Exception):
    """An error for the person running lazybuild. `hint` says what to try; `exit_code` is the command's status.

    Raise a subclass, with `hint=` when this case knows better than its class what to try."""

    exit_code = 1
    hint = ""  # may name `{command}`: the boundary puts in the command that was run

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class UsageError(LazybuildError):
    """Flags or arguments that do not fit together (argparse itself exits 2 for unknown flags)."""

    exit_code = 2
    hint = "`lazybuild {command} --help` lists its arguments and flags"


class InputError(LazybuildError, ValueError):
    """A value or file the user gave that lazybuild cannot take: a reference, a platform, a digest, a config."""

    exit_code = 1
    hint = "correct the value named above; `lazybuild {command} --help` says what each argument takes"


class BadDockerfile(InputError):
    """A Dockerfile (with its build args and context) that BuildKit would refuse too, or lazybuild cannot build."""

    hint = "see the Dockerfile line named above; `lazybuild inspect-dockerfile CONTEXT` shows how lazybuild reads it"


class DataError(LazybuildError):
    """Bytes that are not what their format or their digest says: a layer, a layout, an image document."""

    exit_code = 1
    hint = ("the data named above is damaged, was changed, or is not in the format lazybuild expects: produce or "
            "fetch it again (`lazybuild layer verify BLOB` checks a layer)")


class RemoteError(LazybuildError):
    """A registry, containerd or BuildKit refused the request, answered nonsense or could not be reached."""

    exit_code = 3
    hint = ("check the address, the network and the login (lazybuild reads ~/.docker/config.json as `docker login` "
            "writes it); loopback registries speak plain HTTP, --insecure skips TLS verification")


class BuildFailure(LazybuildError):
    """A build that cannot go on: a RUN step exited non-zero, a COPY source is missing, the export failed."""

    exit_code = 4
    hint = "the log above shows the failing step; steps that finished stay cached for the next build"


class HostError(LazybuildError):
    """This machine lacks something lazybuild needs to run or mount: FUSE, overlayfs, runc, root."""

    exit_code = 5
    hint = "lazybuild build, mount and snapshotter need root, /dev/fuse, overlayfs and runc on this machine"


class MountError(HostError):
    """A lazy mount could not be made or served."""

    hint = ("a lazy mount needs root and /dev/fuse; `lazybuild mount --status DIR` shows what a mount fetched, "
            "`lazybuild umount DIR` removes one left behind")


class SnapshotterError(HostError):
    """The containerd snapshotter could not do what containerd asked."""

    hint = "run the snapshotter with --log-level debug to see each request and why it failed"


class MissingExtra(HostError):
    """An optional dependency is missing or does not import; the message names the command that needs it."""

    def __init__(self, command: str, module: str, extra: str, reason: str = ""):
        super().__init__(f"{command} needs {module}, from the {extra!r} extra" + (f": {reason}" if reason else ""),
                         hint=f"install it with: pip install 'lazybuild[{extra}]' (pyfuse3 builds against "
                              f"libfuse3-dev and pkg-config)")
        self.command, self.module, self.extra = command, module, extra


# Modules that come with an extra (pyproject's optional-dependencies), not with lazybuild itself: a
# ModuleNotFoundError for one of them is a missing install, not a bug. trio comes with pyfuse3.
EXTRA_OF_MODULE = {"pyfuse3": "mount", "trio": "mount"}


def missing_extra(error: ImportError, command: str) -> MissingExtra | None:
    """The MissingExtra an ImportError of an optional module stands for, or None for any other import error."""
    module = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    return MissingExtra(command, module, extra, str(error)) if extra else None


def require_extra(module: str, command: str) -> None:
    """Import an optional MODULE now, so that COMMAND fails with MissingExtra before it starts its work
    (or forks a child that would fail where nobody reads the traceback)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(command, module, EXTRA_OF_MODULE[module], str(e)) from None
