"""Progress on stderr, as `docker buildx build --progress` has it: the one place that decides how.

`configure(mode)` is called once by the command line with `--progress`; commands then ask for a
`progress_bar(label)` per transfer and for `log` lines, and get what the mode says:

- tty: bars (tqdm), even when stderr is a file or CI is set;
- plain: lines, a transfer's at most every PLAIN_EVERY_S seconds and one when it is done;
- quiet: nothing (errors still come through the error boundary);
- rawjson: one JSON object per event (`{"label", "current", "total"}`, `"done": true` on the last one of a
  transfer, or `{"message"}`);
- auto: tty on a terminal unless $CI is set, else plain.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .options import PROGRESS_MODES

PLAIN_EVERY_S = 5.0

_mode = "plain"


def resolve(mode: str) -> str:
    """The mode `auto` stands for here (tty or plain); any other mode as it is."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        return "tty" if sys.stderr.isatty() and not os.environ.get("CI") else "plain"
    return mode


def configure(mode: str) -> None:
    global _mode
    _mode = resolve(mode)


def mode() -> str:
    return _mode


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _json_line(event: dict) -> None:
    print(json.dumps(event, ensure_ascii=False), file=sys.stderr, flush=True)


def log(message: str) -> None:
    """A progress message (a build's step lines): a line, a JSON event, or nothing when quiet."""
    if _mode == "quiet":
        return
    if _mode == "rawjson":
        _json_line({"message": message})
    else:
        print(message, file=sys.stderr, flush=True)


def _succeeded() -> bool:
    """Whether the transfer being closed finished: close() runs in a `finally`, where a failure is in flight.
    (A total is not enough: a tar's is its size, padding included, which the bytes converted never reach.)"""
    return sys.exc_info()[0] is None


def progress_bar(label: str):
    """(update(done, total), close) for one transfer of bytes named LABEL; update is None when nothing is
    shown. Call close() when the transfer ends, from a `finally`: a done line or event is said only for a
    transfer that finished."""
    if _mode == "quiet":
        return None, lambda: None
    state = {"done": 0, "total": 0, "said": time.monotonic()}

    def update(done: int, total: int) -> None:
        state.update(done=done, total=total)
        if _mode == "rawjson":
            _json_line({"label": label, "current": done, "total": total})
        elif time.monotonic() - state["said"] >= PLAIN_EVERY_S:
            state["said"] = time.monotonic()
            print(f"lazybuild: {label}: {_size(done)} of {_size(total)}", file=sys.stderr, flush=True)

    def close() -> None:
        if not _succeeded():
            return
        if _mode == "rawjson":
            _json_line({"label": label, "current": state["done"], "total": state["total"], "done": True})
        else:
            print(f"lazybuild: {label}: {_size(state['done'])} done", file=sys.stderr, flush=True)

    if _mode in ("rawjson", "plain"):
        return update, close
    from tqdm import tqdm  # tty

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False, file=sys.stderr,
               dynamic_ncols=sys.stderr.isatty())

    def update_bar(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    def close_bar() -> None:
        if _succeeded() and bar.total:
            bar.update(bar.total - bar.n)  # finished: the full bar, whatever tqdm's rate limit skipped
            bar.refresh()
        bar.close()

    return update_bar, close_bar
