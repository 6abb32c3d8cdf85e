"""Argument types and values more than one command takes: sizes, platforms, prioritized-file lists."""

from __future__ import annotations

import argparse
import json
import re

from ..errors import InputError

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
