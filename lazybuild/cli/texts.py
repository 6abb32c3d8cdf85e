"""The text `--format text` prints for the documents commands share: an image, a layer blob, a copy, a mount's
status. Short and readable; the whole document is what `--format json` prints."""

from __future__ import annotations

from ..image import size_text


def _size(n) -> str:
    return size_text(n) if isinstance(n, int) else "?"


def image(doc: dict) -> str:
    """`inspect`: the image's name, digest and platform, then one line per layer (size, media type, digest)."""
    config = doc.get("config") or {}
    platform = "/".join(filter(None, (config.get("os"), config.get("architecture"), config.get("variant"))))
    manifest = doc.get("manifest") or {}
    lines = [f"{doc.get('reference', '?')}", f"  digest    {doc.get('digest', '?')}",
             f"  platform  {platform or '?'}", f"  created   {config.get('created', '?')}"]
    if doc.get("index"):
        lines.append(f"  index of {len(doc['index'].get('manifests', []))} manifests")
    layers = manifest.get("layers", [])
    lines.append(f"  {len(layers)} layers")
    for layer in layers:
        kind = "eStargz " if "containerd.io/snapshot/stargz/toc.digest" in (layer.get("annotations") or {}) else ""
        media = str(layer.get("mediaType", "?")).rsplit(".", 1)[-1]
        lines.append(f"    {_size(layer.get('size')):>10}  {kind}{media:<8} {layer.get('digest', '?')}")
    return "\n".join(lines)


def blob(doc: dict) -> str:
    """`layer convert`: the blob's digest, size and TOC digest."""
    return (f"{doc.get('digest', '?')}  {_size(doc.get('size'))}  {doc.get('mediaType', '?')}\n"
            f"  TOC digest  {doc.get('tocDigest', '?')}\n  diff ID     {doc.get('diffID', '?')}")


def copied(doc: dict) -> str:
    """`copy`, `pull`, `push`, `convert`, `optimize`: what went where, and its digest."""
    return f"{doc.get('source', '?')} -> {doc.get('destination', '?')}\n  digest  {doc.get('digest', '?')}"


def mount_status(doc: dict) -> str:
    """`mount --status`: per layer what was fetched of it."""
    lines = [f"{doc.get('mountpoint', '?')} (pid {doc.get('pid', '?')})"]
    for layer in doc.get("layers", []):
        lines.append(f"  {layer.get('digest', '?')}  {_size(layer.get('fetchedBytes'))} of "
                     f"{_size(layer.get('size'))} fetched ({layer.get('fetchedPercent', 0)}%)"
                     + ("" if layer.get("lazy", True) else ", not lazy"))
    return "\n".join(lines)
