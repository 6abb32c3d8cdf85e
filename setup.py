"""The package's layout and its build hook, in one place.

Components stand at the top of the repository (the design card's folders) and import under one
namespace: COMPONENTS maps each import name to its folder, and the packages are found by walking
those folders for `__init__.py`, so a new subpackage can never be left out of the wheel.

The build hook compiles our .proto subsets with grpcio-tools before the modules are collected. The
generated *_pb2.py / *_pb2_grpc.py land next to the .proto files (every `proto/` folder of the
packages) and are never edited or committed; every build (wheel or editable install) regenerates them.
"""

import glob
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# import name -> folder (relative to this file)
COMPONENTS = {
    "lazybuild": "lazybuild",
    "lazybuild.builder": "builder",
    "lazybuild.exporter": "exporter",
    "lazybuild.frontend": "frontend",
    "lazybuild.mounter": "mounter",
    "lazybuild.snapshotter": "snapshotter",
}


def find_packages() -> dict[str, str]:
    """Every package (import name -> folder) under the components' folders."""
    found = {}
    for name, folder in COMPONENTS.items():
        for dirpath, dirs, files in os.walk(os.path.join(HERE, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            if "__init__.py" not in files:
                dirs[:] = []
                continue
            rel = os.path.relpath(dirpath, os.path.join(HERE, folder))
            sub = "" if rel == "." else "." + rel.replace(os.sep, ".")
            found[name + sub] = os.path.relpath(dirpath, HERE)
    return found


PACKAGES = find_packages()
# (source dir, the import path the generated code uses): every package folder named `proto` holds
# .proto files; they sit at this virtual root so that generated imports read
# `from lazybuild.frontend.llb.proto import ops_pb2`.
PROTO_DIRS = [(os.path.join(HERE, folder), name.replace(".", "/"))
              for name, folder in PACKAGES.items() if name.endswith(".proto")]


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto_dir, virtual in PROTO_DIRS:
        protos = sorted(glob.glob(os.path.join(proto_dir, "*.proto")))
        with tempfile.TemporaryDirectory() as out:
            args = ["grpc_tools.protoc", f"-I{virtual}={proto_dir}", f"-I{well_known}",
                    f"--python_out={out}", f"--grpc_python_out={out}"]
            args += [f"{virtual}/{os.path.basename(p)}" for p in protos]
            if protoc.main(args) != 0:
                raise RuntimeError("protoc failed on " + ", ".join(protos))
            for path in glob.glob(os.path.join(out, virtual, "*.py")):
                shutil.copy(path, os.path.join(proto_dir, os.path.basename(path)))


class BuildPyWithProtos(build_py):
    def run(self):
        compile_protos()
        super().run()


setup(packages=sorted(PACKAGES), package_dir={name: folder for name, folder in PACKAGES.items()},
      cmdclass={"build_py": BuildPyWithProtos})
