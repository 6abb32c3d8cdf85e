"""`python -m lazybuild.frontend`: the entry point of the frontend image."""

import os
import sys

from .main import main

if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # the relay threads block on stdin forever; BuildKit takes the result when we exit
