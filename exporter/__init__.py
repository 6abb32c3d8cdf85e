"""Build results -> optimized eStargz layers, image config, manifest -> a registry or an OCI layout.

One path (`assemble.py`) for both entry points: `daemonless.py` (`lazybuild build`: diffs are overlay upper
dirs) and `buildkit.py` (the export step inside BuildKit: diffs of states). Images go out through
`lazybuild.transfer`'s destinations. `output.py` reads `--output`, `rootfs.py` writes tar/local outputs,
`optimize.py` records what a workload reads first."""
