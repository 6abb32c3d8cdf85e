"""Dockerfile text -> the instruction tree BuildKit's parser makes (frontend/dockerfile/parser in moby/buildkit).

Same rules as BuildKit: parser directives (`syntax`, `escape`, `check`) only at the top; line continuation
with the escape token, skipping comment lines and (with a warning) empty lines inside a continuation;
heredocs for RUN/COPY/ADD (and ONBUILD of those); flags (`--x=y`) split off every instruction; JSON (exec)
form where it parses, shell form otherwise. `Node.dump()` prints the tree exactly as BuildKit's
`Node.Dump()`, which the golden files in BuildKit's parser/testfiles hold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import BadDockerfile

DEFAULT_ESCAPE = "\\"
VALID_DIRECTIVES = ("syntax", "escape", "check")
HEREDOC_INSTRUCTIONS = ("add", "copy", "run")

_WHITESPACE = re.compile(r"[\t\v\f\r ]+")
_DIRECTIVE = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_HEREDOC = re.compile(r"^(\d*)<<(-?)\s*([^<]*)$")


class DockerfileError(BadDockerfile):
    """A Dockerfile BuildKit would refuse, with the lines it is about."""

    def __init__(self, message: str, start_line: int = 0, end_line: int = 0, filename: str = "Dockerfile"):
        super().__init__(message)
        self.message, self.start_line, self.end_line, self.filename = message, start_line, end_line or start_line, filename

    def __str__(self) -> str:
        return f"{self.filename}:{self.start_line}: {self.message}" if self.start_line else f"{self.filename}: {self.message}"


@dataclass
class Heredoc:
    name: str
    file_descriptor: int = 0
    expand: bool = True
    chomp: bool = False
    content: str = ""


@dataclass
class Node:
    """BuildKit's s-expression node: `value`, the `next` token, `children` (for the root and ONBUILD)."""

    value: str = ""
    next: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    heredocs: list[Heredoc] = field(default_factory=list)
    attributes: dict[str, bool] = field(default_factory=dict)
    original: str = ""
    flags: list[str] = field(default_factory=list)
    start_line: int = 0
    end_line: int = 0
    prev_comment: list[str] = field(default_factory=list)

    def tokens(self) -> list[str]:
        """The values of the `next` chain: an instruction's arguments."""
        out, n = [], self.next
        while n is not None:
            out.append(n.value)
            n = n.next
        return out

    def dump(self) -> str:
        s = self.value.lower()
        if self.flags:
            s += " [" + " ".join(go_quote(f) for f in self.flags) + "]"
        for child in self.children:
            s += "(" + child.dump() + ")\n"
        n = self.next
        while n is not None:
            s += " " + (n.dump() if n.children else go_quote(n.value))
            n = n.next
        return s.strip()

    def can_contain_heredoc(self) -> bool:
        node = self
        if node.value.lower() == "onbuild" and node.next is not None and node.next.children:
            node = node.next.children[0]
        return node.value.lower() in HEREDOC_INSTRUCTIONS and not node.attributes.get("json")


@dataclass
class Directive:
    name: str
    value: str
    line: int


@dataclass(frozen=True)
class Warning:  # noqa: A001 - BuildKit's name; nothing here uses the builtin
    """Something BuildKit's parser warns about (and its frontend sends through the gateway's Warn)."""

    short: str
    detail: str
    url: str
    line: int
    filename: str = "Dockerfile"

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}: {self.short[0].lower()}{self.short[1:]}"


@dataclass
class Result:
    ast: Node
    escape_token: str
    warnings: list[Warning]
    directives: list[Directive]


def go_quote(s: str) -> str:
    """Go's strconv.Quote: the golden files print every token this way."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


class _Directives:
    """Directive detection and the escape token: directives end at the first line that is not one."""

    def __init__(self):
        self.done = False
        self.seen: dict[str, Directive] = {}
        self.line = 0
        self.set_escape(DEFAULT_ESCAPE)

    def set_escape(self, token: str) -> None:
        if token not in ("`", "\\"):
            raise ValueError(f"invalid escape token '{token}' does not match ` or \\")
        self.escape = token
        e = re.escape(token)
        # The token continues a line when it is last (trailing blanks allowed) and not itself escaped.
        self.continuation = re.compile(rf"([^{e}]){e}[ \t]*$|^{e}[ \t]*$")

    def parse_line(self, line: str) -> Directive | None:
        self.line += 1
        if self.done:
            return None
        if not line.startswith("#"):
            self.done = True
            return None
        m = _DIRECTIVE.match(line[1:].lstrip())
        if not m or m.group(1).lower() not in VALID_DIRECTIVES:
            self.done = True
            return None
        name = m.group(1).lower()
        if name in self.seen:
            raise ValueError(f"only one {name} parser directive can be used")
        d = self.seen[name] = Directive(name, m.group(2), self.line)
        if name == "escape":
            self.set_escape(d.value)
        return d

    def trim_continuation(self, line: str) -> tuple[str, bool]:
        """(line without the continuation token, whether the instruction ends here)."""
        if self.continuation.search(line):
            return self.continuation.sub(lambda m: m.group(1) or "", line), False
        return line, True


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _lines(text: str) -> list[str]:
    """Lines with their endings kept (heredoc bodies need them)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def parse(text: str, filename: str = "Dockerfile") -> Result:
    d = _Directives()
    root = Node(start_line=-1)
    warnings: list[Warning] = []
    comments: list[str] = []
    lines = _lines(text)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    i = 0
    current = 0

    def err(message: str, start: int, end: int = 0) -> DockerfileError:
        return DockerfileError(message, start, end, filename)

    def process(raw: str, strip: bool) -> tuple[str, bool]:
        line = raw.rstrip("\r\n")
        if strip:
            line = line.lstrip()
        try:
            is_directive = d.parse_line(line) is not None
        except ValueError as e:
            raise err(str(e), current + 1) from None
        return ("" if _is_comment(line) else line), is_directive

    while i < len(lines):
        raw = lines[i]
        i += 1
        if _is_comment(raw):
            comment = raw.lstrip()[1:].strip()
            comments = comments + [comment] if comment else []
        line, is_directive = process(raw, True)
        if is_directive and comments:
            comments = comments[:-1]
        current += 1
        start = current
        line, end_of_line = d.trim_continuation(line)
        if end_of_line and not line:
            continue
        parts = [line]
        empty_continuation = False
        while not end_of_line and i < len(lines):
            raw = lines[i]
            i += 1
            cont, _ = process(raw, False)
            current += 1
            if _is_comment(raw):
                continue
            if not cont.strip():
                empty_continuation = True
                continue
            cont, end_of_line = d.trim_continuation(cont)
            parts.append(cont)
        line = "".join(parts)
        if empty_continuation:
            warnings.append(Warning("Empty continuation line found in: " + line,
                                    "Empty continuation lines will become errors in a future release",
                                    "https://github.com/moby/moby/pull/33719", current, filename))
        try:
            child = _node_from_line(line, d, comments)
        except ValueError as e:
            raise err(str(e), start, current) from None
        if child.can_contain_heredoc() and "<<" in line:
            for doc in _heredocs_in(line):
                body = []
                while True:
                    if i >= len(lines):
                        raise err("unterminated heredoc", start, current)
                    raw = lines[i]
                    i += 1
                    current += 1
                    candidate = raw.rstrip("\r\n")
                    if doc.chomp:
                        candidate = candidate.lstrip("\t")
                    if candidate == doc.name:
                        break
                    body.append(raw)
                doc.content = "".join(body)
                child.heredocs.append(doc)
        child.start_line, child.end_line = start, current
        if root.start_line < 0:
            root.start_line = start
        root.end_line = current
        root.children.append(child)
        comments = []
    if root.start_line < 0:
        raise err("file with no instructions", current)
    return Result(root, d.escape, warnings, list(d.seen.values()))


# --- one instruction -------------------------------------------------------------------------------------


def _node_from_line(line: str, d: _Directives, comments: list[str]) -> Node:
    cmd, flags, args = _split_command(line, d)
    parse_args = _DISPATCH.get(cmd.lower(), _parse_ignore)
    nxt, attrs = parse_args(args, d)
    return Node(value=cmd, original=line, flags=flags, next=nxt, attributes=attrs or {}, prev_comment=list(comments))


def _split_command(line: str, d: _Directives) -> tuple[str, list[str], str]:
    parts = _WHITESPACE.split(line.strip(), maxsplit=1)
    if len(parts) < 2:
        return parts[0], [], ""
    args, flags = _extract_flags(parts[1], d)
    return parts[0], flags, args.strip()


def _extract_flags(line: str, d: _Directives) -> tuple[str, list[str]]:
    """Leading `--name[=value]` words (quotes and escapes honoured); `--` ends them."""
    words: list[str] = []
    pos = 0
    n = len(line)
    while True:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos == n:
            return "", words
        if not line.startswith("--", pos):
            return line[pos:], words
        word: list[str] = []
        quote = ""
        blank_ok = False
        while pos < n:
            ch = line[pos]
            if quote:
                if ch == quote:
                    quote = ""
                    pos += 1
                    continue
                if ch == d.escape:
                    if pos + 1 == n:
                        quote = ""
                        pos += 1
                        continue
                    pos += 1
                    ch = line[pos]
                word.append(ch)
                pos += 1
                continue
            if ch.isspace():
                break
            if ch in "'\"":
                quote, blank_ok = ch, True
                pos += 1
                continue
            if ch == d.escape:
                if pos + 1 == n:
                    pos += 1
                    continue
                pos += 1
                ch = line[pos]
            word.append(ch)
            pos += 1
        text = "".join(word)
        if text == "--":
            return line[pos:], words
        if blank_ok or text:
            words.append(text)


def _parse_words(rest: str, d: _Directives) -> list[str]:
    """Whitespace-separated words, quotes and escapes kept as written (ENV/LABEL/ARG values)."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    blank_ok = False
    pos, n = 0, len(rest)
    while pos < n:
        ch = rest[pos]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == d.escape and quote != "'":
                if pos + 1 == n:
                    pos += 1
                    continue
                word.append(ch)
                pos += 1
                ch = rest[pos]
            word.append(ch)
            pos += 1
            continue
        if ch.isspace():
            if in_word and (blank_ok or word):
                words.append("".join(word))
            word, in_word, blank_ok = [], False, False
            pos += 1
            continue
        in_word = True
        if ch in "'\"":
            quote, blank_ok = ch, True
        if ch == d.escape:
            if pos + 1 == n:
                pos += 1
                continue
            word.append(ch)
            pos += 1
            ch = rest[pos]
        word.append(ch)
        pos += 1
    if in_word and (blank_ok or word):
        words.append("".join(word))
    return words


def _chain(values: list[str]) -> Node | None:
    head = None
    for v in reversed(values):
        head = Node(value=v, next=head)
    return head


def _parse_ignore(rest, d):
    return Node(), None


def _parse_sub_command(rest, d):
    if not rest:
        return None, None
    return Node(children=[_node_from_line(rest, d, [])]), None


def _parse_name_val(rest: str, key: str, d: _Directives) -> Node | None:
    words = _parse_words(rest, d)
    if not words:
        return None
    if "=" not in words[0]:  # the legacy `ENV key value` form: one pair, the value is the rest of the line
        parts = _WHITESPACE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise ValueError(f"{key} must have two arguments")
        return _chain([parts[0], parts[1], ""])
    values = []
    for w in words:
        if "=" not in w:
            raise ValueError(f"Syntax error - can't find = in {go_quote(w)}. Must be of the form: name=value")
        k, v = w.split("=", 1)
        values += [k, v, "="]
    return _chain(values)


def _parse_env(rest, d):
    return _parse_name_val(rest, "ENV", d), None


def _parse_label(rest, d):
    return _parse_name_val(rest, "LABEL", d), None


def _parse_name_or_name_val(rest, d):
    return _chain(_parse_words(rest, d)), None


def _parse_whitespace_delimited(rest, d):
    if not rest:
        return None, None
    return _chain(_WHITESPACE.split(rest)), None


def _parse_string(rest, d):
    return (Node(value=rest) if rest else None), None


class _NotStringArray(ValueError):
    pass


def _parse_json(rest: str) -> tuple[Node | None, dict]:
    rest = rest.lstrip()
    if not rest.startswith("["):
        raise ValueError("not a JSON array")
    try:
        items = json.loads(rest)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(items, list):
        raise ValueError("not a JSON array")
    if not all(isinstance(x, str) for x in items):
        raise _NotStringArray("when using JSON array syntax, arrays must be comprised of strings only")
    return _chain(items), {"json": True}


def _parse_maybe_json(rest, d):
    if not rest:
        return None, None
    try:
        return _parse_json(rest)
    except _NotStringArray:
        raise
    except ValueError:
        return Node(value=rest), None


def _parse_maybe_json_to_list(rest, d):
    try:
        return _parse_json(rest)
    except _NotStringArray:
        raise
    except ValueError:
        return _parse_whitespace_delimited(rest, d)


def _parse_health_config(rest, d):
    m = re.match(r"(\S*)(\s*)(.*)$", rest, re.S)
    kind, remainder = m.group(1), m.group(3)
    if not kind:
        return None, None
    cmd, attrs = _parse_maybe_json(remainder, d)
    return Node(value=kind, next=cmd), attrs


_DISPATCH = {
    "add": _parse_maybe_json_to_list,
    "arg": _parse_name_or_name_val,
    "cmd": _parse_maybe_json,
    "copy": _parse_maybe_json_to_list,
    "entrypoint": _parse_maybe_json,
    "env": _parse_env,
    "expose": _parse_whitespace_delimited,
    "from": _parse_whitespace_delimited,
    "healthcheck": _parse_health_config,
    "label": _parse_label,
    "maintainer": _parse_string,
    "onbuild": _parse_sub_command,
    "run": _parse_maybe_json,
    "shell": _parse_maybe_json,
    "stopsignal": _parse_string,
    "user": _parse_string,
    "volume": _parse_maybe_json_to_list,
    "workdir": _parse_string,
}


# --- heredoc words ---------------------------------------------------------------------------------------


def _raw_words(line: str) -> list[str]:
    """Shell words with quotes and escapes kept, for spotting `<<EOF` words."""
    words, word, quote, i = [], [], "", 0
    while i < len(line):
        ch = line[i]
        if quote:
            word.append(ch)
            if ch == "\\" and quote == '"' and i + 1 < len(line):
                word.append(line[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
            if ch in "'\"":
                quote = ch
            elif ch == "\\" and i + 1 < len(line):
                word.append(line[i + 1])
                i += 1
        i += 1
    if word:
        words.append("".join(word))
    return words


def _unquote(word: str) -> str:
    out, quote, i = [], "", 0
    while i < len(word):
        ch = word[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                out.append(ch)
        elif ch == "\\" and i + 1 < len(word) and (not quote or word[i + 1] in '"\\$`'):
            out.append(word[i + 1])
            i += 1
        elif ch in "'\"" and (not quote or ch == quote):
            quote = "" if quote else ch
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def parse_heredoc(word: str) -> Heredoc | None:
    """`<<EOF`, `<<-EOF` (tabs chomped), `3<<EOF`; quoting any part of the name turns expansion off."""
    m = _HEREDOC.match(word)
    if not m or not m.group(3):
        return None
    rest = m.group(3)
    name = _unquote(rest)
    if not name or _WHITESPACE.search(name):
        return None
    quotes = lambda s: s.count("'") + s.count('"')
    return Heredoc(name=name, file_descriptor=int(m.group(1) or 0), chomp=m.group(2) == "-",
                   expand=quotes(name) == quotes(rest))


def _heredocs_in(line: str) -> list[Heredoc]:
    return [h for h in (parse_heredoc(w) for w in _raw_words(line)) if h is not None]


def chomp_heredoc_content(content: str) -> str:
    return re.sub(r"(?m)^\t+", "", content)
