"""The snapshotter's metadata: every snapshot with its parent, kind, labels, sizes and, for a lazy
layer, where its bytes come from. One sqlite file under the root, written in transactions, so a
restart (or a crash) finds every snapshot again.

Snapshot ids come from AUTOINCREMENT and are never reused: they name directories, and a FUSE
directory name must never point at another layer than the kernel may have cached under it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from lazybuild.errors import SnapshotterError

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd's Kind enum values
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}


class SnapshotError(SnapshotterError):
    """An error containerd understands: `code` is one of its errdefs classes (mapped to gRPC codes)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def not_found(key: str) -> SnapshotError:
    return SnapshotError("not_found", f"snapshot {key!r} does not exist")


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    remote: dict | None = None  # lazy layer: {"ref", "digest", "size", "toc_digest", "media_type"}
    size: int = 0
    inodes: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL,
    kind INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    labels TEXT NOT NULL,
    remote TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""
_COLUMNS = "id, key, parent, kind, created, updated, labels, remote, size, inodes"


class Store:
    def __init__(self, path: str):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _row(row) -> Snapshot:
        return Snapshot(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]),
                        json.loads(row[7]) if row[7] else None, row[8], row[9])

    def get(self, key: str) -> Snapshot | None:
        with self.lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def require(self, key: str) -> Snapshot:
        snap = self.get(key)
        if snap is None:
            raise not_found(key)
        return snap

    def all(self) -> list[Snapshot]:
        with self.lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The committed parents of `snap`, nearest first."""
        out = []
        parent = snap.parent
        while parent:
            p = self.require(parent)
            out.append(p)
            parent = p.parent
        return out

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str], remote: dict | None = None,
               size: int = 0) -> Snapshot:
        if not key:
            raise SnapshotError("invalid_argument", "snapshot key must not be empty")
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                    raise SnapshotError("already_exists", f"snapshot {key!r} already exists")
                if parent:
                    row = self.db.execute("SELECT kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
                    if row is None:
                        raise SnapshotError("not_found", f"parent snapshot {parent!r} does not exist")
                    if row[0] != COMMITTED:
                        raise SnapshotError("invalid_argument", f"parent {parent!r} is not a committed snapshot")
                cur = self.db.execute(
                    "INSERT INTO snapshots (key, parent, kind, created, updated, labels, remote, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, parent, kind, now, now, json.dumps(labels), json.dumps(remote) if remote else None, size))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return Snapshot(cur.lastrowid, key, parent, kind, now, now, dict(labels), remote, size)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT kind FROM snapshots WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise not_found(key)
                if row[0] != ACTIVE:
                    raise SnapshotError("failed_precondition", f"snapshot {key!r} is not active: only an "
                                        "active snapshot can be committed")
                if self.db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                    raise SnapshotError("already_exists", f"snapshot {name!r} already exists")
                self.db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?, updated = ? "
                                "WHERE key = ?", (name, COMMITTED, json.dumps(labels), size, inodes, time.time(), key))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.require(name)

    def remove(self, key: str) -> Snapshot:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise not_found(key)
                if self.db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone():
                    raise SnapshotError("failed_precondition", f"cannot remove snapshot {key!r}: it has children")
                self.db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self._row(row)

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self.lock:
            cur = self.db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                                  (json.dumps(labels), time.time(), key))
            if cur.rowcount == 0:
                raise not_found(key)
        return self.require(key)
