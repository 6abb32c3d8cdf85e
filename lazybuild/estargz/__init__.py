"""eStargz and eStargz-with-zstd layers, byte-compatible with containerd/stargz-snapshotter.

    blob = build("layer.tar", out, compression="gzip", prioritized_files=[...])
    with LayerReader.open_file("layer.blob") as r:
        r.verify(blob.toc_digest); r.read_file("etc/hostname")
"""

from .errors import (
    ChunkDigestMismatch,
    EStargzError,
    FooterError,
    FormatError,
    LimitExceeded,
    PrioritizedFileNotFound,
    TOCDigestMismatch,
    UnsafeEntryError,
    UnsupportedEntryError,
)
from .extract import extract
from .reader import Blob, FileBlob, LayerReader, Node
from .toc import (
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_ZSTD,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    TOCEntry,
)
from .writer import DEFAULT_CHUNK_SIZE, LayerBlob, build, convert_file

__all__ = [
    "Blob", "ChunkDigestMismatch", "DEFAULT_CHUNK_SIZE", "EStargzError", "FileBlob", "FooterError", "FormatError",
    "LayerBlob", "LayerReader", "LimitExceeded", "MEDIA_TYPE_GZIP", "MEDIA_TYPE_ZSTD", "NO_PREFETCH_LANDMARK", "Node",
    "PREFETCH_LANDMARK", "PrioritizedFileNotFound", "TOCDigestMismatch", "TOCEntry", "TOC_DIGEST_ANNOTATION",
    "UNCOMPRESSED_SIZE_ANNOTATION", "UnsafeEntryError", "UnsupportedEntryError", "build", "convert_file", "extract",
]
