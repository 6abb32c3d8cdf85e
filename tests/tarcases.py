"""Temporary: the old name of support.tarcases, until the last tests importing it move."""
from support.tarcases import *  # noqa: F401,F403
from support.tarcases import CASES, CHUNK, ustar_all_types  # noqa: F401
