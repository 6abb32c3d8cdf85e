"""Exceptions of the layer format. Each names the layer and, where there is one, the entry."""

from ..errors import DataError


class EStargzError(DataError):
    """Base of every error raised by lazybuild.estargz."""


class FormatError(EStargzError):
    """The bytes are not an eStargz/stargz/zstd-chunked layer, or are truncated or malformed."""


class FooterError(FormatError):
    """The blob does not end with a footer we know (eStargz 51 bytes, legacy 47, zstd 40)."""


class TOCDigestMismatch(EStargzError):
    """The TOC JSON does not hash to the digest the manifest annotation promises."""


class ChunkDigestMismatch(EStargzError):
    """A payload chunk does not hash to its chunkDigest: the blob is corrupt; its bytes are never returned."""


class UnsafeEntryError(EStargzError):
    """An entry name or link target climbs out of the layer root, or extraction would pass a symlink."""


class PrioritizedFileNotFound(EStargzError):
    """A prioritized path names no entry of the layer."""


class UnsupportedEntryError(EStargzError):
    """A tar entry type eStargz cannot hold (e.g. GNU sparse)."""


class LimitExceeded(FormatError):
    """The layer asks for more work than a cap allows before it can be verified (a TOC, a chunk or a
    tar header past its size limit). The message names the cap and the size asked for."""
