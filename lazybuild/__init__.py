"""lazybuild: container builds and starts that never download what is not read."""

__version__ = "0.1.0"
