"""Lazy, read-only FUSE mounts of eStargz layers: `lazybuild mount`, the builder's bases, the snapshotter.

The modules, each one job:
  cache.py     the chunk cache: verified, uncompressed chunks by digest, shared by every mount
  layer.py     one layer's TOC and its verified reads (file, offset) -> chunks -> cache or registry
  fetch.py     opening a layer: footer + TOC from the registry (optionally kept on disk), or the
               whole blob when it is not eStargz
  prefetch.py  fetching ahead: the prefetch up to `.prefetch.landmark`, the background fetch
  rootfs.py    the trees (inode tables): an image's merged root, one dir per layer, the
               snapshotter's layer dirs; pure data
  fs.py        the only pyfuse3 code: thin Operations over a tree, and FuseMount
  mount.py     mounting an image: open its layers, prefetch, serve, status, umount; mount_image()

The public API is what this module exports; other components import nothing else from the mounter.

Mounting an image (the builder, the optimizer, `lazybuild mount`):
  mount_image(ref, mountpoint, MountOptions(...)) -> MountedImage (.status(), .close()): served by a
      forked child, returns once the mount is up; MountOptions.prefetch_files ({layer digest: [paths]},
      a build profile) fetches those files at once, and the status reports it as `filePrefetch`
  serve(ref, mountpoint, MountOptions) (in this process, until unmounted), umount(mountpoint),
  status(mountpoint) (per layer: size, bytes fetched, served from cache, prefetched), is_mounted(path)

Serving lazy layers yourself (the snapshotter):
  ChunkCache(dir, limit_bytes)            the shared chunk cache (DEFAULT_CACHE_LIMIT_BYTES)
  fetch_layer(registry, repo, desc, toc_dir=, tail=) -> FetchedLayer
                                          footer + TOC (NotEStargz if it is not eStargz)
  FetchedLayer.verify_toc(digest), .build(cache) -> LazyLayer
                                          the TOC checked, then indexed (a FormatError if hostile)
  LazyLayer                               .stats (LayerStats, .to_json()), .read_around,
                                          .has_prefetch_landmark, .chunk_keys(), .unpacked_usage()
  Prefetch(layer, enabled)                locks what it will stream; .run() or .cancel()
  FilePrefetch(layer, paths, exclude)     a list of files (a build profile's): locks their chunks, .run()
                                          fetches them in a few merged Range requests, or .cancel()
  background_fetch(layer, stop, idle_s)   the rest of the layer while no read waits
  LayerDirs()                             a tree of layer directories: reserve, fill | fail, remove
  fuse_mount(tree, mountpoint, fsname) -> FuseMount
                                          serve a tree at mountpoint (await .serve(), .stop(), .close())
  LayerError, NotEStargz                  a layer that cannot be served lazily

pyfuse3 (the `mount` extra) is imported only when something is mounted in this process.
"""

from .cache import DEFAULT_LIMIT_BYTES as DEFAULT_CACHE_LIMIT_BYTES
from .cache import ChunkCache
from .fetch import FetchedLayer, fetch_layer
from .layer import LayerError, LayerStats, LazyLayer, NotEStargz
from .mount import MountedImage, MountOptions, is_mounted, mount_image, serve, status, umount
from .prefetch import FilePrefetch, Prefetch, background_fetch
from .rootfs import LayerDirs


def fuse_mount(tree, mountpoint: str, fsname: str = "lazybuild", record: str | None = None):
    """Serve `tree` read-only at `mountpoint` from this process: a fs.FuseMount (one per process)."""
    from .fs import FuseMount

    return FuseMount(tree, mountpoint, fsname, record)


__all__ = ["DEFAULT_CACHE_LIMIT_BYTES", "ChunkCache", "FetchedLayer", "FilePrefetch", "LayerDirs", "LayerError",
           "LayerStats", "LazyLayer", "MountOptions", "MountedImage", "NotEStargz", "Prefetch", "background_fetch",
           "fetch_layer", "fuse_mount", "is_mounted", "mount_image", "serve", "status", "umount"]
