"""What more than one command takes: the options every command has (`Parser`), sizes, platforms,
prioritized-file lists."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import EXIT_USAGE, InputError

FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROGRESS_MODES = ("auto", "plain", "tty", "quiet", "rawjson")  # as `docker buildx build --progress`

# The commands that show progress (--progress), and those with one primary result, a digest or an ID,
# that -q prints alone. By command path, so that a command gets them by being listed here.
PROGRESS_COMMANDS = frozenset({"build", "pull", "push", "convert", "copy", "mount", "optimize", "layer convert"})
QUIET_COMMANDS = frozenset({"build", "pull", "push", "convert", "copy", "optimize", "inspect", "layer convert",
                            "profile push"})

# Global options, accepted before the command name (`lazybuild --debug build`) and after it (`lazybuild
# build --debug`): the top parser holds their defaults; a command's parser adds them with SUPPRESS as
# default, so that not giving one after the name keeps what was given before it. Their dests are named so
# that no command's own option takes them over (`layer convert` has a `format`: estargz or zstdchunked).
GLOBAL_DEFAULTS = {"output_format": "text", "log_level": "info", "debug": False, "progress": "auto", "quiet": False}


class Parser(argparse.ArgumentParser):
    """lazybuild's argument parser: every command's parser has the global options, and a usage error is
    said as every other error is (`lazybuild: error: ...`, a hint, exit 2) instead of argparse's usage text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = self.prog.partition(" ")[2]  # "" for the top parser, "layer convert" for a subcommand
        top = not self.command
        default = {"default": argparse.SUPPRESS} if not top else {}
        group = self.add_argument_group("global options")
        group.add_argument("--format", dest="output_format", choices=FORMATS, **default,
                           help="the result on stdout: text for people, or one JSON document (default text)")
        group.add_argument("--log-level", choices=LOG_LEVELS, **default,
                           help="the messages on stderr from this level up (default info)")
        group.add_argument("--debug", action="store_true", **default,
                           help="debug messages, each with the module that wrote it (--log-level debug)")
        if self.command in PROGRESS_COMMANDS:
            group.add_argument("--progress", choices=PROGRESS_MODES, **default,
                               help="auto (tty on a terminal, plain in CI or into a file), plain (lines), tty "
                                    "(bars, even into a file), quiet (none), rawjson (one JSON object per event); "
                                    "default auto")
        if self.command in QUIET_COMMANDS:
            group.add_argument("-q", "--quiet", action="store_true", **default,
                               help="print only the result's digest")
        if top:
            self.set_defaults(**GLOBAL_DEFAULTS)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown argument is reported by the command it was given to (its hint
        names that command's --help, not the top one's)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            words = sys.argv[1:] if args is None else list(args)
            parser = self
            for word in words:  # the deepest command named in ARGS
                parser = subcommands(parser).get(word, parser)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def error(self, message: str):
        """A usage error (unknown flag, missing argument, bad value): what is wrong, where help is, exit 2."""
        print(f"lazybuild: error: {message}", file=sys.stderr)
        print(f"lazybuild: hint: see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """PARSER's commands by name (aliases left out), or {} if it has none."""
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            seen, out = set(), {}
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out[name] = sub
            return out
    return {}


def walk_commands(parser: argparse.ArgumentParser):
    """(command path, parser) of every command under PARSER, depth first, in the order they were added;
    the top parser is ("", parser)."""
    yield getattr(parser, "command", ""), parser
    for sub in subcommands(parser).values():
        yield from walk_commands(sub)

_SIZE_RE = re.compile(r"^(\d+)\s*([KMG]i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(text: str) -> int:
    """`4194304`, `4MiB`, `512Ki` -> bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4194304 or 4MiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    size = int(m.group(1)) * _UNITS[unit]
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def platform_of(args):
    """The `--platform` a command was given as a Platform, or None for the default."""
    from ..image import Platform

    return Platform.parse(args.platform) if getattr(args, "platform", None) else None


def read_prioritized_files(path: str) -> list[str]:
    """One path per line, or the NDJSON access record `{"path": ...}` that `lazybuild mount --record` writes."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["path"]
            except (ValueError, KeyError, TypeError):
                line = None
            if not isinstance(line, str):
                raise InputError(f"{path}:{lineno}: expected a path or {{\"path\": ...}}",
                                 hint="write one path per line, or give the record `lazybuild mount --record` "
                                      "wrote") from None
        out.append(line)
    return out
