"""Shared fixtures: the reference checker and the input tars, made once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tarcases  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(REPO, "..", "shared"))


@pytest.fixture(scope="session")
def oracle(tmp_path_factory) -> str:
    """`estargz-oracle`: upstream stargz-snapshotter's estargz library (Debian 0.12) as a command.

    scripts/setup.sh installs it; without it the session builds it (needs Go + the Debian package).
    """
    found = shutil.which("estargz-oracle")
    if found:
        return found
    out = str(tmp_path_factory.mktemp("oracle") / "estargz-oracle")
    subprocess.run(["bash", os.path.join(SHARED, "tools/estargz-oracle/build.sh"), out], check=True)
    return out


@pytest.fixture(scope="session")
def tars(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tars")
    return {name: make(str(d / f"{name}.tar"), str(d / f"{name}-work")) for name, make in tarcases.CASES.items()}
