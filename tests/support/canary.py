"""A canary tree outside every test root: evil inputs aim at it, and it must come out untouched.

The tree stands in for the host (/etc, /root, ...): files with known contents and modes, a directory
an attacker would write into, a file an attacker would delete. `Canary.check()` compares everything
(names, types, modes, owners, sizes, mtimes, contents, link targets) with the snapshot taken when
it was made, so a write, a chmod, a chown, a new file or an unlink anywhere under it fails the test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid


class Canary:
    def __init__(self, base: str = "/var/tmp"):
        self.root = os.path.join(base, f"lazybuild-canary-{uuid.uuid4().hex[:10]}")
        os.makedirs(os.path.join(self.root, "etc", "cron.d"))
        os.makedirs(os.path.join(self.root, "root"))
        self.secret = os.path.join(self.root, "etc", "shadow")
        self.victim = os.path.join(self.root, "root", "victim")
        self.writable_dir = os.path.join(self.root, "etc", "cron.d")
        with open(self.secret, "w") as f:
            f.write("root:CANARY-SECRET:19000:0:99999:7:::\n")
        os.chmod(self.secret, 0o600)
        with open(self.victim, "w") as f:
            f.write("must not be deleted\n")
        with open(os.path.join(self.writable_dir, "keep"), "w") as f:
            f.write("* * * * * root true\n")
        os.symlink("shadow", os.path.join(self.root, "etc", "shadow.link"))
        self._before = self.snapshot()

    def snapshot(self) -> dict[str, tuple]:
        seen: dict[str, tuple] = {}
        for dirpath, dirs, files in os.walk(self.root):
            for name in [*dirs, *files, ""]:
                path = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(path)
                extra: object = None
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        extra = hashlib.sha256(f.read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    extra = os.readlink(path)
                rel = os.path.relpath(path, self.root)
                seen[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                             st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None, extra)
        return seen

    def check(self) -> None:
        """Fail (AssertionError naming the paths) if anything under the canary changed."""
        after = self.snapshot()
        changed = sorted(k for k in set(self._before) | set(after) if self._before.get(k) != after.get(k))
        assert not changed, f"host canary changed: {changed} under {self.root}"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def rel_from(self, start: str) -> str:
        """The canary's path relative to START: what a `../../..` attack from START would write."""
        return os.path.relpath(self.root, start)
