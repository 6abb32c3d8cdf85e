"""Where lazybuild keeps things on the host unless told otherwise, each movable by its environment variable.

A module of its own so that the command line can show these defaults without importing the components
that use them (the CLI imports a command's component only when that command runs).
"""

import os

STATE_DIR = os.environ.get("LAZYBUILD_STATE", "/var/lib/lazybuild")  # step cache, cache mounts, profiles, kept blobs
CACHE_DIR = os.environ.get("LAZYBUILD_CACHE", "/var/cache/lazybuild")  # the lazy mounts' chunk cache (and kept TOCs)
