"""`lazybuild snapshotter`: a containerd remote snapshotter (proxy plugin) backed by the mounter, through
its public API only (`lazybuild.mounter`: layers, the chunk cache, prefetch, a FUSE tree of layer dirs).

store.py keeps the snapshots (sqlite), remote.py turns layer labels into lazily mounted eStargz
layers, snapshots.py is the snapshotter's semantics (containerd's overlayfs snapshotter plus remote
layers), service.py the gRPC API, server.py the daemon (FUSE mount + gRPC socket + signals).
"""
