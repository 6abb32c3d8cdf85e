"""`python -m lazybuild.frontend`: the entry point of the frontend image."""

import os
import sys

if __name__ == "__main__":
    from .gateway import Bridge

    # The Ping's round trip (the first call also waits for buildkitd's side of the connection) overlaps
    # importing the Dockerfile front end and the converter; main() pings this same bridge.
    Bridge.from_stdio().start_ping()
    from .main import main

    code = main()
    sys.stderr.flush()
    os._exit(code)  # the gRPC reader blocks on stdin forever; BuildKit takes the result when we exit
