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
| (a HostError)   | 5    | a dependency of lazybuild itself does not import       | (`pip install --force-reinstall lazybuild`) |

Beside them the command line exits 2 for argparse's usage errors (an unknown flag, a missing argument, a
value not among the choices), 1 for a file the system refused (OSError: no such file, permission denied),
130 when interrupted (Ctrl-C, SIGTERM during a build) and 70 for a bug (EXIT_* below).

InputError is also a ValueError: the parsers reported bad values with ValueError before this
hierarchy existed, and code that catches ValueError around them keeps working.
"""

from __future__ import annotations

import importlib

# The exit codes, one per area (the classes below carry theirs); README's "Errors and exit codes" lists them.
EXIT_INPUT = 1  # a value, file or data the user gave; also a file the system refused
EXIT_USAGE = 2  # the command line (argparse's usage errors too)
EXIT_REMOTE = 3  # a registry, containerd or BuildKit
EXIT_BUILD = 4  # a build step or its export
EXIT_HOST = 5  # this machine lacks something, an extra included
EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error, never a user's
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class LazybuildError(Exception):
    """An error for the person running lazybuild. `hint` says what to try; `exit_code` is the command's status.

    Raise a subclass, with `hint=` when this case knows better than its class what to try."""

    exit_code = EXIT_INPUT
    hint = ""  # may name `{command}`: the boundary puts in the command that was run

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class UsageError(LazybuildError):
    """Flags or arguments that do not fit together (argparse itself exits 2 for unknown flags)."""

    exit_code = EXIT_USAGE
    hint = "`lazybuild {command} --help` lists its arguments and flags"


class InputError(LazybuildError, ValueError):
    """A value or file the user gave that lazybuild cannot take: a reference, a platform, a digest, a config."""

    exit_code = EXIT_INPUT
    hint = "correct the value named above; `lazybuild {command} --help` says what each argument takes"


class BadDockerfile(InputError):
    """A Dockerfile (with its build args and context) that BuildKit would refuse too, or lazybuild cannot build."""

    hint = "see the Dockerfile line named above; `lazybuild inspect-dockerfile CONTEXT` shows how lazybuild reads it"


class DataError(LazybuildError):
    """Bytes that are not what their format or their digest says: a layer, a layout, an image document."""

    exit_code = EXIT_INPUT
    hint = ("the data named above is damaged, was changed, or is not in the format lazybuild expects: produce or "
            "fetch it again (`lazybuild layer verify BLOB` checks a layer)")


class RemoteError(LazybuildError):
    """A registry, containerd or BuildKit refused the request, answered nonsense or could not be reached."""

    exit_code = EXIT_REMOTE
    hint = ("check the address, the network and the login (lazybuild reads ~/.docker/config.json as `docker login` "
            "writes it); loopback registries speak plain HTTP, --insecure skips TLS verification")


class BuildFailure(LazybuildError):
    """A build that cannot go on: a RUN step exited non-zero, a COPY source is missing, the export failed."""

    exit_code = EXIT_BUILD
    hint = "the log above shows the failing step; steps that finished stay cached for the next build"


class HostError(LazybuildError):
    """This machine lacks something lazybuild needs to run or mount: FUSE, overlayfs, runc, root."""

    exit_code = EXIT_HOST
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

# The top-level modules of lazybuild's own dependencies (pyproject's dependencies): if one is missing, the
# install is broken, and that is said as such rather than as a bug's traceback.
DEPENDENCY_MODULES = frozenset({"zlib_ng", "zstandard", "httpx", "httpcore", "h11", "grpc", "google", "tqdm"})


def missing_extra(error: ImportError, command: str) -> HostError | None:
    """What an ImportError of a module lazybuild does not ship stands for: a MissingExtra for an optional
    module, a HostError for one of lazybuild's dependencies, None for any other import error (a bug)."""
    module = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra:
        return MissingExtra(command, module, extra, str(error))
    if module in DEPENDENCY_MODULES:
        return HostError(f"{command} needs {module}, which lazybuild depends on: {error}",
                         hint="the install is incomplete: reinstall lazybuild with its dependencies (pip install "
                              "--force-reinstall lazybuild, or `pip install -e .` in a checkout)")
    return None


def require_extra(module: str, command: str) -> None:
    """Import an optional MODULE now, so that COMMAND fails with MissingExtra before it starts its work
    (or forks a child that would fail where nobody reads the traceback)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(command, module, EXTRA_OF_MODULE[module], str(e)) from None
