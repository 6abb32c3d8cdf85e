"""Progress bars on stderr, drawn only for a person at a terminal."""

from __future__ import annotations

import os
import sys


def progress_bar(label: str):
    """(callback(done, total), close) drawing a bar on a terminal; nothing in CI or when stderr is a file."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close
