"""Lazy FUSE mounts of eStargz images (pyfuse3): `lazybuild mount REF DIR`.

cache.py (content-addressed verified chunks), layer.py (one layer: TOC, lazy reads, prefetch,
background fetch), rootfs.py (the merged tree with whiteouts and inodes), fs.py (pyfuse3 operations),
mount.py (orchestration, daemon, status, umount).
"""
