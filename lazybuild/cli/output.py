"""Where a command's words go: its result on stdout (text for people, or one JSON document), its messages on
stderr through Python logging, each line starting with `lazybuild: `.

A command builds one `Result` and hands it to `emit`; it never prints its result itself, so that
`--format json` and `-q` mean the same for every command.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

JSON_INDENT = 2  # one pretty document: readable as it is, and `json.loads` / `jq` take it whole


@dataclass(frozen=True)
class Result:
    """What a command produced.

    `document` is its JSON value (a dict, or a list for a listing); `text` its rendering for people (lines,
    no trailing newline; "" prints nothing); `primary` the one value `-q` prints (a digest or an ID), None
    for a command without one."""

    document: Any
    text: str
    primary: str | None = None


def wants_json(args) -> bool:
    """Whether ARGS ask for JSON: `--format json`, or `--json` (the flag `layer ls` and `profile ls` had
    before --format), which still works with a line saying so."""
    if getattr(args, "json", False):
        if not getattr(args, "_json_deprecation_said", False):
            logging.getLogger("lazybuild.cli").warning("--json is deprecated: use --format json")
            args._json_deprecation_said = True
        return True
    return getattr(args, "output_format", "text") == "json"


def emit(args, result: Result) -> None:
    """Print RESULT on stdout as ARGS ask: `-q` its primary value, `--format json` its document, else its text."""
    as_json = wants_json(args)
    if getattr(args, "quiet", False) and result.primary is not None:
        print(result.primary)
    elif as_json:
        print(json.dumps(result.document, indent=JSON_INDENT, ensure_ascii=False))
    elif result.text:
        print(result.text)
    sys.stdout.flush()


class Listing:
    """A result made of rows: in text each row's line is printed as it comes (a listing can be long and
    read through `head`); in JSON the rows are one array, printed when the listing closes.

        with output.Listing(args) as listing:
            for entry in entries:
                listing.add(document, line)
    """

    def __init__(self, args):
        self.args, self.rows, self.as_json = args, [], wants_json(args)

    def add(self, document, text: str) -> None:
        if self.as_json:
            self.rows.append(document)
        else:
            print(text)

    def __enter__(self) -> "Listing":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.as_json:
            emit(self.args, Result(self.rows, ""))


class _MessageFormatter(logging.Formatter):
    """`lazybuild: MESSAGE` for info, `lazybuild: warning: MESSAGE` (error, debug) for the other levels,
    as the error boundary words errors; with --debug also the logger's name (the module that wrote it)."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        kind = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        where = f"{record.name}: " if self.debug else ""
        text = f"lazybuild: {kind}{where}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a message comes (not the one at configuration)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str = "info", debug: bool = False) -> None:
    """Send every logger's messages from LEVEL up (debug with DEBUG) to stderr in lazybuild's words, once
    for the whole process; a second call replaces the first (tests call main() again and again)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "lazybuild", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.lazybuild = True
    handler.setFormatter(_MessageFormatter(debug))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else getattr(logging, level.upper()))
    # The HTTP client says one line per request at info: that is debug detail for us.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else max(logging.WARNING, root.level))
