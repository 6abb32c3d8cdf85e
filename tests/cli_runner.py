"""Temporary: the old name of support.cli_runner, until the last tests importing it move."""
from support.cli_runner import LAZYBUILD, lazybuild  # noqa: F401
