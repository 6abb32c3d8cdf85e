"""Dockerfile shell words: quote removal, `$VAR`/`${VAR...}` expansion and word splitting.

Behaves like BuildKit's `frontend/dockerfile/shell` lexer (not like a full POSIX shell):
no command substitution, no globbing, no arithmetic; only the `${}` modifiers
`-  +  ?` (each optionally with `:`), `#  ##  %  %%` and `/  //`, whose patterns are
shell globs with `*` and `?` only (no `[...]` classes), as in BuildKit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import BadDockerfile

__all__ = ["ShellError", "ShellLex", "WordResult", "env_from_list"]

# Go's unicode.IsSpace set. Python's str.isspace() also accepts \x1c-\x1f, which Go does
# not, and splitting must agree with BuildKit on every character.
GO_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"

# POSIX special parameters. A Dockerfile never sets them, but `$@x` must still read the
# name as `@` (so it expands to "" followed by "x") rather than as a literal "$@x".
_SPECIAL_PARAMS = "@*#?-$!0"


class ShellError(BadDockerfile):
    """A word that cannot be expanded. `reason` is the message without the
    `failed to process "<word>": ` prefix that BuildKit puts in front of it."""

    def __init__(self, reason: str, word: str | None = None):
        self.reason = reason
        self.word = word
        super().__init__(reason if word is None else f"failed to process {_go_quote(word)}: {reason}")


_GO_NAMED_ESCAPES = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t", "\v": r"\v",
                     "\\": "\\\\", '"': '\\"'}


def _go_quote(text: str) -> str:
    """`text` quoted like Go's %q, so our messages read exactly like BuildKit's."""
    out = []
    for ch in text:
        if ch in _GO_NAMED_ESCAPES:
            out.append(_GO_NAMED_ESCAPES[ch])
        elif ch.isprintable():  # same set as Go's unicode.IsPrint
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


@dataclass
class WordResult:
    result: str
    words: list[str]
    matched: set[str] = field(default_factory=set)    # variable names looked up and set
    unmatched: set[str] = field(default_factory=set)  # looked up but unset (BuildKit lints these)


def env_from_list(env: Iterable[str]) -> dict[str, str]:
    """`["K=V", ...]` as a dict; a later K overrides an earlier one and a bare `K` is set to ""."""
    out = {}
    for item in env:
        key, _, value = item.partition("=")
        out[key] = value
    return out


class ShellLex:
    """Expands Dockerfile words. `escape_token` is the `# escape=` directive: `\\` or a backtick.

    The keyword options are the switches BuildKit's parser and converter flip:
    raw_quotes keeps quote characters in the output, raw_escapes keeps escape tokens,
    skip_process_quotes treats quotes as ordinary characters, and skip_unset_env leaves
    references to unset variables in the output as written instead of expanding them to "".
    """

    def __init__(self, escape_token: str = "\\", *, raw_quotes: bool = False, raw_escapes: bool = False,
                 skip_process_quotes: bool = False, skip_unset_env: bool = False):
        if len(escape_token) != 1:
            raise ValueError(f"escape token must be one character, not {escape_token!r}")
        self.escape_token = escape_token
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.skip_process_quotes = skip_process_quotes
        self.skip_unset_env = skip_unset_env

    def process_word(self, word: str, env: Mapping[str, str] | Iterable[str]) -> str:
        """The single word `word` stands for, with quotes removed and variables expanded;
        unquoted whitespace is kept (it does not split here)."""
        return self.process_word_with_matches(word, env).result

    def process_words(self, word: str, env: Mapping[str, str] | Iterable[str]) -> list[str]:
        """`word` split like a shell would: unquoted whitespace, including whitespace that
        comes out of an unquoted expansion, separates words; empty words are dropped."""
        return self.process_word_with_matches(word, env).words

    def process_word_with_matches(self, word: str, env: Mapping[str, str] | Iterable[str]) -> WordResult:
        """Both forms at once, plus which variables were found and which were not."""
        env = dict(env) if isinstance(env, Mapping) else env_from_list(env)
        expander = _Expander(self, word, env)
        try:
            result, words = expander.until(None, self.raw_escapes)
        except ShellError as e:
            raise ShellError(e.reason, word) from None
        return WordResult(result, words, expander.matched, expander.unmatched)


class _Scanner:
    """One character of look-ahead over the word; None stands for the end."""

    def __init__(self, text: str):
        # Go's text/scanner, which BuildKit reads words with, skips a leading byte-order mark.
        self.text = text.removeprefix("\ufeff")
        self.pos = 0

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def next(self) -> str | None:
        ch = self.peek()
        if ch is not None:
            self.pos += 1
        return ch

    def take_while(self, pred) -> str:
        start = self.pos
        while self.pos < len(self.text) and pred(self.text[self.pos]):
            self.pos += 1
        return self.text[start:self.pos]


class _Words:
    """Collects the split form of a word alongside its joined form."""

    def __init__(self):
        self.words: list[str] = []
        self.current: list[str] = []

    def add_unquoted(self, text: str) -> None:
        # Unquoted text, literal or the value of $VAR: whitespace ends the current word.
        for ch in text:
            if ch not in GO_WHITESPACE:
                self.current.append(ch)
            elif self.current:
                self.words.append("".join(self.current))
                self.current = []

    def add_quoted(self, text: str) -> None:
        # Quoted or escaped text always belongs to the current word, spaces and all. An empty
        # quoted string ('' or "") does not make a word of its own, as in BuildKit.
        if text:
            self.current.append(text)

    def finish(self) -> list[str]:
        if self.current:
            self.words.append("".join(self.current))
            self.current = []
        return self.words


class _Expander:
    """One pass over one word. Recursive: the text inside `${v:-...}` and the parts of
    `${v/.../...}` are words of their own, read up to their closing delimiter."""

    def __init__(self, lex: ShellLex, word: str, env: dict[str, str]):
        self.lex = lex
        self.scan = _Scanner(word)
        self.env = env
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def until(self, stop: str | None, raw_escapes: bool) -> tuple[str, list[str]]:
        """Read up to and past `stop` (None: the end of the word); returns (joined, split)."""
        lex, scan = self.lex, self.scan
        out: list[str] = []
        words = _Words()
        while (ch := scan.peek()) is not None:
            if ch == stop:
                scan.next()
                return "".join(out), words.finish()
            if ch == "$":
                text = self.dollar()
                words.add_unquoted(text)  # an unquoted expansion is split on its whitespace
            elif ch == "<":
                text = self.maybe_heredoc()
                words.add_quoted(text)
            elif ch in "'\"" and not lex.skip_process_quotes:
                text = self.single_quoted() if ch == "'" else self.double_quoted(raw_escapes)
                words.add_quoted(text)
            elif ch != lex.escape_token:
                text = scan.next()
                words.add_unquoted(text)
            else:
                scan.next()
                if raw_escapes:
                    words.add_quoted(ch)
                    out.append(ch)
                text = scan.next()
                if text is None:  # a trailing escape token escapes nothing and is dropped
                    break
                words.add_quoted(text)  # an escaped character never splits words
            out.append(text)
        if stop is not None:
            raise ShellError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), words.finish()

    def single_quoted(self) -> str:
        # Everything up to the next ' is literal; there is no way to escape a ' inside.
        scan = self.scan
        quote = scan.next()
        text = scan.take_while(lambda c: c != "'")
        if scan.next() is None:
            raise ShellError("unexpected end of statement while looking for matching single-quote")
        return f"{quote}{text}{quote}" if self.lex.raw_quotes else text

    def double_quoted(self, raw_escapes: bool) -> str:
        # Literal except for $ expansions; the escape token only escapes " $ and itself,
        # before anything else it stays as written.
        scan, esc = self.scan, self.lex.escape_token
        quote = scan.next()
        out = [quote] if self.lex.raw_quotes else []
        while True:
            ch = scan.peek()
            if ch is None:
                raise ShellError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                scan.next()
                if self.lex.raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            scan.next()
            if ch == esc:
                if raw_escapes:
                    out.append(ch)
                following = scan.peek()
                if following is None:
                    continue  # the unterminated quote is reported on the next round
                if following in ('"', "$", esc):
                    ch = scan.next()
            out.append(ch)

    def maybe_heredoc(self) -> str:
        # `<<` and any blanks after it stay glued to the delimiter word (`<< EOF` is one
        # word), so the parser can spot heredocs among the split words.
        scan = self.scan
        scan.next()
        if scan.peek() != "<":
            return "<"
        scan.next()
        return "<<" + scan.take_while(lambda c: c in " \t\r")

    def name(self) -> str:
        scan = self.scan
        ch = scan.peek()
        if ch is None:
            return ""
        if ch.isdecimal():  # positional parameter: all the digits, `$12x` is ${12}x
            return scan.take_while(str.isdecimal)
        if ch in _SPECIAL_PARAMS:
            return scan.next()
        # str.isdecimal is Go's unicode.IsDigit (category Nd); str.isdigit would also take "²"
        return scan.take_while(lambda c: c.isalpha() or c.isdecimal() or c == "_")

    def lookup(self, name: str) -> str | None:
        value = self.env.get(name)
        (self.unmatched if value is None else self.matched).add(name)
        return value

    def value_of(self, name: str, as_written: str) -> str:
        value = self.lookup(name)
        if value is None:
            return as_written if self.lex.skip_unset_env else ""
        return value

    def closed_by(self, stop: str, raw_escapes: bool, missing: str) -> str:
        # A nested word that hits the end of the input reports the missing delimiter of
        # the ${} rather than the inner reason.
        try:
            return self.until(stop, raw_escapes)[0]
        except ShellError:
            if self.scan.peek() is None:
                raise ShellError(missing) from None
            raise

    def dollar(self) -> str:
        scan = self.scan
        scan.next()  # the $
        if scan.peek() != "{":
            name = self.name()
            # `$` before something that cannot start a name is literal
            return self.value_of(name, "$" + name) if name else "$"

        scan.next()  # the {
        ch = scan.peek()
        if ch is None:
            raise ShellError("syntax error: missing '}'")
        if ch in "{}:":
            raise ShellError("syntax error: bad substitution")
        name = self.name()
        op = scan.next()
        if op == "}":
            return self.value_of(name, "${" + name + "}")

        colon = op == ":"  # with ':' an empty value counts as unset
        if colon:
            op = scan.next()
        if op is None:
            raise ShellError("syntax error: missing '}'")
        modifier = ":" + op if colon else op
        if colon or op in "-+?#%":
            return self.modifier(name, op, modifier, colon)
        if op == "/":
            return self.replace(name)
        raise ShellError(f"unsupported modifier ({modifier}) in substitution")

    def modifier(self, name: str, op: str, modifier: str, colon: bool) -> str:
        # Patterns of # and % keep their escapes, so `\*` still means a literal star when
        # the pattern is turned into a regex.
        is_pattern = op in "#%"
        if colon and is_pattern:
            raise ShellError(f"unsupported modifier ({modifier}) in substitution")
        word = self.closed_by("}", is_pattern, "syntax error: missing '}'")
        value = self.lookup(name)
        if value is None and self.lex.skip_unset_env:
            return "${" + name + modifier + word + "}"
        unset = value is None or (colon and value == "")
        if op == "-":
            return word if unset else value
        if op == "+":
            return "" if unset else word
        if op == "?":
            if unset:
                default = "is not allowed to be unset" if value is None else "is not allowed to be empty"
                raise ShellError(f"{name}: {word or default}")
            return value
        if op in "#%":
            longest = word.startswith(op)  # ## and %% remove the longest match
            if longest:
                word = word[1:]
            trim = _trim_suffix if op == "%" else _trim_prefix
            return trim(word, value or "", longest)
        raise ShellError(f"unsupported modifier ({modifier}) in substitution")

    def replace(self, name: str) -> str:
        scan = self.scan
        replace_all = scan.peek() == "/"
        if replace_all:
            scan.next()
        pattern = self.closed_by("/", True, "syntax error: missing '/' in ${}")
        replacement = self.closed_by("}", True, "syntax error: missing '}'")
        value = self.lookup(name)
        if value is None and self.lex.skip_unset_env:
            return "${" + name + ("//" if replace_all else "/") + pattern + "/" + replacement + "}"
        regex = _glob_regex(pattern, greedy=True)
        value = value or ""
        if not replace_all:
            m = regex.search(value)
            return value if m is None else value[:m.start()] + replacement + value[m.end():]
        return _replace_all(regex, value, replacement)


def _glob_regex(pattern: str, greedy: bool) -> re.Pattern[str]:
    """A shell glob (`*`, `?`, and backslash escapes of `* ? \\`) as a regex.

    The escapes are always backslashes, whatever the Dockerfile's escape token: the
    pattern arrives with its escape tokens kept raw, and only backslash means escape here.
    """
    out = []
    # BuildKit reads the pattern with Go's text/scanner, which drops a leading BOM.
    for tok in _glob_tokens(pattern.removeprefix("\ufeff")):
        if tok == "*":
            out.append(".*" if greedy else ".*?")
        elif tok == "?":
            out.append(".")
        elif not tok.startswith("\\"):
            out.append(re.escape(tok))
        elif tok[1:] in ("*", "?", "\\", "}", "/"):
            # \} and \/ only kept a ${} delimiter from ending the pattern; either way literal
            out.append(re.escape(tok[1:]))
        else:
            escaped = tok[1:] or "\ufffd"  # what Go prints for a backslash at the end
            raise ShellError(f"invalid pattern ({pattern}) in substitution: invalid escape '\\{escaped}'")
    return re.compile("".join(out))


def _glob_tokens(pattern: str) -> list[str]:
    """Characters, except that a backslash and the character after it are one token."""
    return re.findall(r"\\.?|.", pattern, re.DOTALL)


def _trim_prefix(pattern: str, value: str, longest: bool) -> str:
    m = _glob_regex(pattern, greedy=longest).match(value)
    return value[m.end():] if m else value


def _trim_suffix(pattern: str, value: str, longest: bool) -> str:
    # A regex finds the leftmost match, not the shortest one ending at the right edge, so
    # reverse both the value and the pattern and trim a prefix instead. Escape pairs keep
    # their order: a\*c reverses to c\*a, not c*\a.
    reversed_pattern = "".join(reversed(_glob_tokens(pattern)))
    return _trim_prefix(reversed_pattern, value[::-1], longest)[::-1]


def _replace_all(regex: re.Pattern[str], value: str, replacement: str) -> str:
    """Every non-overlapping match replaced, with Go's rule for empty matches: one right
    after a previous match is skipped. (Python 3.7+ re.sub replaces it, which would turn
    `${v//*/x}` into "xx"; BuildKit and bash give "x".)"""
    out = []
    last_end = pos = 0
    while pos <= len(value):
        m = regex.search(value, pos)
        if m is None:
            break
        start, end = m.span()
        out.append(value[last_end:start])
        if end > last_end or start == 0:
            out.append(replacement)
        last_end = end
        pos = max(end, pos + 1)  # always move on, at least by one character
    out.append(value[last_end:])
    return "".join(out)
