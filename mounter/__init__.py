"""Lazy FUSE mounts of eStargz images (pyfuse3). See ARCHITECTURE.md."""
