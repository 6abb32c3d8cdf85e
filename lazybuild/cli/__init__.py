"""The `lazybuild` command line: one module per command, assembled here, and the one error boundary.

Commands hand their result to `output.emit` (stdout: text, or one JSON document with --format json) and say
everything else on stderr (`progress.py` for progress, Python logging for messages). They raise a
LazybuildError (lazybuild/errors.py) for anything a person can fix; `main` prints it as `lazybuild: error: ...`
with its hint and exits with its code; usage errors are said the same way by `options.Parser` (exit 2). Any
other exception is a bug in lazybuild: it prints its traceback and exits 70.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from .. import __version__
from ..errors import EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED, LazybuildError, missing_extra
from . import build, completion, dockerfile, image, layer, mount, optimize, output, profiles, progress, snapshotter
from .options import Parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lazybuild", description="Lazy container builds and starts with eStargz.")
    p.add_argument("--version", action="version", version=f"lazybuild {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    layer.add_parser(sub)
    image.add_parser(sub)  # pull, push, convert
    dockerfile.add_parser(sub)
    mount.add_parser(sub)  # mount, umount
    snapshotter.add_parser(sub)  # snapshotter, rpull
    image.add_inspect_parser(sub)
    optimize.add_parser(sub)
    build.add_parser(sub)
    profiles.add_parser(sub)  # profile ls, show, push, rm
    completion.add_parser(sub)
    _add_version_parser(sub)
    return p


def _add_version_parser(sub) -> None:
    v = sub.add_parser("version", help="print lazybuild's version (and Python's)")
    v.set_defaults(func=_version)


def _version(args) -> int:
    python = ".".join(map(str, sys.version_info[:3]))
    output.emit(args, output.Result({"version": __version__, "python": python}, f"lazybuild {__version__}",
                                    primary=__version__))
    return 0


def _bounded_malloc() -> None:
    """Keep big buffers (4 MiB chunks) in mmap so freeing them returns memory to the OS.

    glibc otherwise raises its mmap threshold after the first large free and serves later chunks from
    per-thread heaps that never shrink: +20 MiB RSS on a 2 GiB layer (bench/convert.py --size 2GiB).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _say(kind: str, text: str) -> None:
    print(f"lazybuild: {kind}: {text}", file=sys.stderr)


def report(error: LazybuildError, command: str = "COMMAND") -> int:
    """Print ERROR for a person (its message, then what to try) and return its exit code."""
    _say("error", str(error))
    if error.hint:
        _say("hint", error.hint.replace("{command}", command))
    return error.exit_code


def _report_os_error(error: OSError) -> int:
    """A file or device the system refused: which one and why, without a traceback."""
    where = "".join(f": {name}" for name in (error.filename, error.filename2) if name)
    _say("error", f"{error.strerror or error}{where}")
    if error.errno in (errno.EPERM, errno.EACCES):
        _say("hint", "mounting, building and serving snapshots need root; other files need read access")
    return EXIT_INPUT


def _command_argv(argv: list[str]) -> list[str]:
    """ARGV from the command name on: global options given before the name are left out."""
    for i, word in enumerate(argv):
        if not word.startswith("-") and (i == 0 or argv[i - 1] not in ("--log-level", "--format")):
            return argv[i:]
    return []


def main(argv: list[str] | None = None) -> int:
    _bounded_malloc()
    argv = sys.argv[1:] if argv is None else list(argv)
    workload = []
    if _command_argv(argv)[:1] in (["build"], ["optimize"]) and "--" in argv:  # `... -- CMD ARGS`: the workload
        workload = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    try:
        args = build_parser().parse_args(argv)  # usage errors: options.Parser says them and exits 2
    except SystemExit as e:  # --help, --version, a usage error: argparse is done
        return e.code if isinstance(e.code, int) else 0
    if workload:
        args.workload = workload
    output.configure_logging(args.log_level, args.debug)
    progress.configure(args.progress)
    command = " ".join([args.command] + [value for name, value in vars(args).items()
                                         if name.endswith("_command") and value])  # e.g. `layer ls`
    try:
        return args.func(args)
    except BrokenPipeError:  # `lazybuild layer ls | head`: the reader has gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LazybuildError as e:
        if args.debug:  # where it was raised, for a bug report
            traceback.print_exc()
        return report(e, command)
    except ImportError as e:  # an optional module (pyfuse3): the install lacks an extra
        extra = missing_extra(e, f"lazybuild {command}")
        if extra is None:
            return _report_bug()
        return report(extra, command)
    except OSError as e:
        return _report_os_error(e)
    except KeyboardInterrupt:
        _say("error", "interrupted")
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: keep everything that helps to find it
        return _report_bug()


def _report_bug() -> int:
    traceback.print_exc()
    _say("error", "this is a bug in lazybuild (the traceback above says where); please report it with the "
                  "command that was run")
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
