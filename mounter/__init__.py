"""Lazy FUSE mounts of eStargz images (pyfuse3): `lazybuild mount REF DIR`.

cache.py (content-addressed verified chunks), layer.py (one layer: TOC, lazy reads, prefetch,
background fetch), rootfs.py (the merged tree with whiteouts and inodes), fs.py (pyfuse3 operations),
mount.py (orchestration, status, umount).

The Python API other components use (the builder mounts its base images with it):
`mount_image(ref, mountpoint, MountOptions(...)) -> MountedImage` (`.status()`, `.close()`).
"""

from .mount import MountedImage, MountOptions, mount_image, status, umount

__all__ = ["MountOptions", "MountedImage", "mount_image", "status", "umount"]
