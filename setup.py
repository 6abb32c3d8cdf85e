"""Build hook: compile our .proto subsets with grpcio-tools before the modules are collected.

The generated *_pb2.py / *_pb2_grpc.py land next to the .proto files (frontend/llb/proto/ for the
BuildKit gateway, snapshotter/proto/ for containerd's snapshots API) and are never edited or
committed; every build (wheel or editable install) regenerates them.
"""

import glob
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# (source dir, the import path the generated code uses): the protos sit at this virtual root so
# that generated imports read `from lazybuild.frontend.llb.proto import ops_pb2`.
PROTO_DIRS = [
    (os.path.join(HERE, "frontend", "llb", "proto"), "lazybuild/frontend/llb/proto"),
    (os.path.join(HERE, "snapshotter", "proto"), "lazybuild/snapshotter/proto"),
]


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


setup(cmdclass={"build_py": BuildPyWithProtos})
