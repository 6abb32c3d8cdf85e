"""Temporary: the old name of lazybuild.testing.images, until the last tests importing it move."""
from lazybuild.testing.images import *  # noqa: F401,F403
from lazybuild.testing.images import CACHE, debootstrap_rootfs, docker_archive  # noqa: F401
