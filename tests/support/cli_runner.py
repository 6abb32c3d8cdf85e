"""Run the installed `lazybuild` console script as users do (quiet: CI=1)."""

import os
import shutil
import subprocess

LAZYBUILD = shutil.which("lazybuild")


def lazybuild(*args, env=None, ok=True) -> subprocess.CompletedProcess:
    p = subprocess.run([LAZYBUILD, *args], capture_output=True, text=True, env={**os.environ, "CI": "1", **(env or {})})
    if ok:
        assert p.returncode == 0, p.stderr
    return p
