"""Evil chunk cache keys that hostile tests of the mounter (unit and integration) aim at the host."""

from __future__ import annotations

import os


def old_cache_path(cache_dir: str, target: str) -> str:
    """The `sha256:` value that the old ChunkCache.path (root/hex[:2]/hex) turned into `target`."""
    chunks = os.path.join(cache_dir, "chunks", "sha256")
    rel = os.path.relpath(target, os.path.join(chunks, ".."))
    assert rel.startswith("..") and os.path.normpath(os.path.join(chunks, rel[:2], rel)) == target
    return "sha256:" + rel
