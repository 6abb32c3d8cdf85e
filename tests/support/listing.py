"""One listing format for a layer, whoever reads it: the reference (`estargz-oracle verify`), our reader,
or an extracted directory. Fields as the oracle prints them; hardlinks show as their target's entry."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess

from lazybuild.estargz import LayerReader


def oracle_listing(oracle: str, blob: str, toc_digest: str | None = None) -> dict[str, dict]:
    cmd = [oracle, "verify"] + (["-toc", toc_digest] if toc_digest else []) + [blob]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"estargz-oracle verify failed on {blob}: {p.stderr}"
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    return {r["name"]: r for r in rows}


def _row(name, type_, mode, uid, gid, size, link, sha, major, minor, xattrs) -> dict:
    return {
        "name": name, "type": type_, "mode": format(mode & 0o7777, "o"), "uid": uid, "gid": gid, "size": size,
        "link": link, "sha256": sha, "devMajor": major, "devMinor": minor,
        "xattrs": {k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())} or None,
    }


def reader_listing(r: LayerReader) -> dict[str, dict]:
    out = {}
    for node in r.walk():
        e = node.entry
        sha = hashlib.sha256(r.read_file(node.path)).hexdigest() if e.type == "reg" else ""
        out[node.path] = _row(node.path, e.type, e.mode, e.uid, e.gid, e.size, e.link_name, sha,
                              e.dev_major, e.dev_minor, e.xattrs)
    return out


def dir_listing(root: str) -> dict[str, dict]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for base in dirnames + filenames:
            full = os.path.join(dirpath, base)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            m = st.st_mode
            kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
                    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}[stat.S_IFMT(m)]
            sha = ""
            if kind == "reg":
                with open(full, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
            xattrs = {}
            if kind != "symlink":
                for k in os.listxattr(full, follow_symlinks=False):
                    xattrs[k] = os.getxattr(full, k, follow_symlinks=False)
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0)
            out[rel] = _row(rel, kind, m, st.st_uid, st.st_gid, st.st_size if kind == "reg" else 0,
                            os.readlink(full) if kind == "symlink" else "", sha, dev[0], dev[1], xattrs)
    return out
