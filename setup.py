"""Build hook: compile the frontend's .proto subset with grpcio-tools before the modules are collected.

The generated *_pb2.py / *_pb2_grpc.py land next to the .proto files (frontend/llb/proto/) and are
never edited or committed; every build (wheel or editable install) regenerates them.
"""

import glob
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "frontend", "llb", "proto")
# The import path the generated code uses: the protos sit at this virtual root so that generated
# imports read `from lazybuild.frontend.llb.proto import ops_pb2`.
VIRTUAL = "lazybuild/frontend/llb/proto"


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "*.proto")))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as out:
        args = ["grpc_tools.protoc", f"-I{VIRTUAL}={PROTO_DIR}", f"-I{well_known}",
                f"--python_out={out}", f"--grpc_python_out={out}"]
        args += [f"{VIRTUAL}/{os.path.basename(p)}" for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(protos))
        for path in glob.glob(os.path.join(out, VIRTUAL, "*.py")):
            shutil.copy(path, os.path.join(PROTO_DIR, os.path.basename(path)))


class BuildPyWithProtos(build_py):
    def run(self):
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
