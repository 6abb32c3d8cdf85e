"""`.dockerignore`: the pattern syntax of moby/patternmatcher (`*`, `?`, `[...]`, `**`, `!` exceptions).

A path is ignored when the last pattern that matches it (or one of its parent directories) is not an
exception. `<Dockerfile>.dockerignore` beside the Dockerfile takes precedence over the context's.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

_ESCAPE = set(".+()|{}$")


@dataclass
class Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern


def read_patterns(text: str) -> list[str]:
    """The lines of a .dockerignore as BuildKit reads them: trimmed, comments dropped, paths cleaned."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = posixpath.normpath(line.replace("\\", "/") if os.sep == "\\" else line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        out.append("!" + line if invert else line)
    return out


def _compile(pattern: str) -> re.Pattern:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")  # `**` crosses directories, zero or more of them
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 1
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"bad .dockerignore pattern {pattern!r}: unterminated [")
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        elif ch in _ESCAPE:
            out.append("\\" + ch)
        else:
            out.append(ch)
        i += 1
    out.append("$")
    return re.compile("".join(out), re.S)


class DockerIgnore:
    def __init__(self, patterns: list[str]):
        self.patterns = []
        for p in patterns:
            exclusion = p.startswith("!")
            text = p[1:] if exclusion else p
            if text:
                self.patterns.append(Pattern(text, exclusion, _compile(text)))

    @classmethod
    def for_dockerfile(cls, context: str, dockerfile: str) -> "DockerIgnore":
        """`<Dockerfile>.dockerignore` beside the Dockerfile if it exists, else the context's `.dockerignore`."""
        for candidate in (dockerfile + ".dockerignore", os.path.join(context, ".dockerignore")):
            if os.path.isfile(candidate):
                with open(candidate, encoding="utf-8") as f:
                    return cls(read_patterns(f.read()))
        return cls([])

    def ignored(self, path: str) -> bool:
        """Is the context-relative `path` ignored (by itself or through a parent directory)?"""
        path = posixpath.normpath(path.lstrip("/")) if path else "."
        parents = path.split("/")[:-1]
        ignored = False
        for p in self.patterns:
            hit = bool(p.regex.match(path))
            if not hit:
                for i in range(len(parents)):
                    if p.regex.match("/".join(parents[: i + 1])):
                        hit = True
                        break
            if hit:
                ignored = not p.exclusion
        return ignored

    def to_json(self) -> list[str]:
        return [("!" if p.exclusion else "") + p.text for p in self.patterns]
