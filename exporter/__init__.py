"""Build output layers -> optimized eStargz (prioritized files + landmark), OCI layout, push. See ARCHITECTURE.md."""
