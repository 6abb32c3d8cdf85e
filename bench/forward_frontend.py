"""The floor of any Python gateway frontend, for bench/frontend.py: start, Ping, hand the whole build to
BuildKit's built-in Dockerfile frontend (`Solve(Frontend="dockerfile.v0")`), Return its result. It runs in
an image made FROM the lazybuild frontend image, so interpreter, grpcio and container start are the same."""

import os
import sys

from lazybuild.frontend.gateway import Bridge
from lazybuild.frontend.llb.proto import gateway_pb2 as gw
from lazybuild.frontend.main import Options

bridge = Bridge.from_stdio()
bridge.ping()
opts = Options.from_env(dict(os.environ))
res = bridge._call("Solve", gw.SolveRequest(Frontend="dockerfile.v0", FrontendOpt=opts.raw, allowResultReturn=True,
                                             allowResultArrayRef=True)).result
bridge.return_result(res)
sys.stderr.flush()
os._exit(0)
