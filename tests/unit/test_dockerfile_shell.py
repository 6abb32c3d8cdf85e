"""Dockerfile shell words: BuildKit's golden files, plus cases of our own.

The golden files are read where they lie (the shared test data), and parsed the way
BuildKit's lex_test.go parses them, trimming included: trailing blanks can be part of
an expected word.
"""

import os

import pytest

from lazybuild.dockerfile.shell import GO_WHITESPACE, ShellError, ShellLex

from support import SHARED
GOLDEN = os.path.join(SHARED, "testdata", "buildkit-dockerfile", "shell")

# The environment TestShellParser4EnvVars expands envVarTest in.
ENV_VAR_TEST_ENV = ["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]


def _go_lines(name):
    """(line number, text) like Go's bufio.Scanner: split on \\n, drop a trailing \\r."""
    with open(os.path.join(GOLDEN, name), encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(n, line.removesuffix("\r")) for n, line in enumerate(lines, 1)]


def _missing(name):
    return [pytest.param(None, None, None, id=f"{name}-missing",
                         marks=pytest.mark.xfail(reason=f"{GOLDEN}/{name} not found", run=False, strict=True))]


def _env_var_cases():
    if not os.path.exists(os.path.join(GOLDEN, "envVarTest")):
        return _missing("envVarTest")
    cases = []
    for n, line in _go_lines("envVarTest"):
        if line.startswith("#"):  # comments are skipped before trimming, as in Go
            continue
        line = line.strip(GO_WHITESPACE)
        if not line:
            continue
        fields = line.split("|")
        assert len(fields) == 3, f"envVarTest:{n}: {line!r}"
        platform, source, expected = (f.strip(GO_WHITESPACE) for f in fields)
        assert platform in ("A", "U", "W"), f"envVarTest:{n}: bad platform tag {platform!r}"
        marks = [pytest.mark.skip(reason="Windows-only case")] if platform == "W" else []
        cases.append(pytest.param(source, expected, platform, id=f"envVarTest:{n}", marks=marks))
    return cases


def _words_cases():
    if not os.path.exists(os.path.join(GOLDEN, "wordsTest")):
        return _missing("wordsTest")
    cases, env = [], []
    for n, line in _go_lines("wordsTest"):
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            env.append(line[3:].lstrip(" "))  # ENV lines accumulate for the lines below
            continue
        fields = line.split("|")
        assert len(fields) == 2, f"wordsTest:{n}: {line!r}"
        source = fields[0].strip(GO_WHITESPACE)
        expected = fields[1].lstrip(" ").split(",")
        cases.append(pytest.param(source, expected, list(env), id=f"wordsTest:{n}"))
    return cases


@pytest.mark.parametrize("source,expected,platform", _env_var_cases())
def test_golden_env_var(source, expected, platform):
    lex = ShellLex("\\")
    if expected == "error":
        with pytest.raises(ShellError):
            lex.process_word(source, ENV_VAR_TEST_ENV)
    else:
        assert lex.process_word(source, ENV_VAR_TEST_ENV) == expected


# lex_test.go also loops over a second mode (raw quotes + skip unset env) but reads the same,
# already exhausted file handle, so BuildKit only ever checks wordsTest in the default mode.
@pytest.mark.parametrize("source,expected,env", _words_cases())
def test_golden_words(source, expected, env):
    try:
        result = ShellLex("\\").process_words(source, env)
    except ShellError:
        result = ["error"]
    assert result == expected


# --- our own cases -------------------------------------------------------------------------

def test_backtick_escape_token():
    lex = ShellLex("`")
    env = {"PWD": "/home"}
    assert lex.process_word("he`$PWD", env) == "he$PWD"
    assert lex.process_word(r"C:\path\$PWD", env) == r"C:\path\/home"  # \ is a plain character
    assert lex.process_word('"a`"b`$PWD"', env) == 'a"b$PWD'
    assert lex.process_word('"a`b"', env) == "a`b"  # escapes only " $ and itself in quotes
    assert lex.process_word("abc`", env) == "abc"
    assert lex.process_words("a` b c", env) == ["a b", "c"]
    with pytest.raises(ShellError):
        lex.process_word('"abc`"', env)


@pytest.mark.parametrize("source,expected", [
    ("${V/o*a/X}", "fXr.gz"),                  # * is greedy in / and //
    ("${V//?a/_}", "foo/_r._r.gz"),
    ("${V//./-}", "foo/bar-tar-gz"),           # regex metacharacters are literal
    ("${V/\\//:}", "foo:bar.tar.gz"),           # \/ is a literal slash in the pattern
    ("${V//[a-z]/x}", "foo/bar.tar.gz"),        # no bracket expressions, as in BuildKit
    ("${V/nothere/x}", "foo/bar.tar.gz"),
    ("${V//*/x}", "x"),                         # no second replacement of the empty tail
    ("${V%.*}", "foo/bar.tar"),
    ("${V%%.*}", "foo/bar"),
    ("${V#*/}", "bar.tar.gz"),
    ("${V##*.}", "gz"),
    ("${V#\\*}", "foo/bar.tar.gz"),
    ("${S%%\\**}", "x"),
    ("${S%\\**}", "x*"),
    ("${S#?\\*}", "*yy"),
    ("${UNSET//a/b}", ""),
    ("${V/a/$R}", "foo/b$5r.tar.gz"),           # the replacement is literal text
])
def test_glob_patterns(source, expected):
    env = {"V": "foo/bar.tar.gz", "S": "x**yy", "R": "$5"}
    assert ShellLex().process_word(source, env) == expected


def test_bad_glob_escape():
    with pytest.raises(ShellError, match=r"invalid pattern \(\\x\) in substitution"):
        ShellLex().process_word("${V#\\x}", {"V": "v"})


def test_required_variable_messages():
    lex = ShellLex()
    with pytest.raises(ShellError) as e:
        lex.process_word("${VAR:?message here$ARG}", ["VAR=", "ARG=x"])
    assert str(e.value) == 'failed to process "${VAR:?message here$ARG}": VAR: message herex'
    assert e.value.reason == "VAR: message herex"
    with pytest.raises(ShellError, match="VAR: is not allowed to be unset$"):
        lex.process_word("${VAR?}", {})
    with pytest.raises(ShellError, match="VAR: is not allowed to be empty$"):
        lex.process_word("${VAR:?}", {"VAR": ""})
    assert lex.process_word("${VAR?message}", {"VAR": ""}) == ""
    assert lex.process_word("${VAR:?message}", {"VAR": "plain"}) == "plain"


@pytest.mark.parametrize("source,message", [
    ("he${}", "syntax error: bad substitution"),
    ("${X", "syntax error: missing '}'"),
    ("${X:-abc", "syntax error: missing '}'"),
    ("${X/abc", "syntax error: missing '/' in ${}"),
    ("${X=abc}", "unsupported modifier (=) in substitution"),
    ("${X:#abc}", "unsupported modifier (:#) in substitution"),
    ("'abc", "unexpected end of statement while looking for matching single-quote"),
    ('"abc', "unexpected end of statement while looking for matching double-quote"),
])
def test_error_messages(source, message):
    with pytest.raises(ShellError) as e:
        ShellLex().process_word(source, {})
    assert e.value.reason == message


def test_env_list_and_matches():
    lex = ShellLex()
    assert lex.process_word("$A-$B-$C", ["A=1", "B", "A=2"]) == "2--"  # last wins, bare B is ""
    r = lex.process_word_with_matches("${FOO:-a} ${BAR:-b} ${BAZ:-c}", {"FOO": "x", "BAR": ""})
    assert (r.result, r.matched, r.unmatched) == ("x b c", {"FOO", "BAR"}, {"BAZ"})


def test_words_keep_text_around_modifiers():
    # BuildKit (since its words-buffer reuse) drops the text before a nested ${v:-...} in the
    # split form; we keep it, as a shell does and as process_word always did.
    lex = ShellLex()
    assert lex.process_words("foo${X:-bar} baz", {}) == ["foobar", "baz"]
    assert lex.process_words('a "b c"${X:-d e}f', {}) == ["a", "b cd", "ef"]


def test_heredoc_marker_stays_one_word():
    lex = ShellLex(raw_quotes=True, raw_escapes=True, skip_unset_env=True)
    assert lex.process_words('cat << "EOF" $UNSET ${U:-x}', {}) == ["cat", '<< "EOF"', "$UNSET", "${U:-x}"]
    assert lex.process_words("a <b", {}) == ["a", "<b"]


def test_skip_unset_env_and_raw_quotes():
    lex = ShellLex(raw_quotes=True, skip_unset_env=True)
    env = {"SET": "v"}
    assert lex.process_word("'$SET' \"$SET\" $U ${U} ${U:+w} ${U//a/b} ${U#p}", env) == \
        "'$SET' \"v\" $U ${U} ${U:+w} ${U//a/b} ${U#p}"
    assert ShellLex(skip_process_quotes=True).process_word("'$SET'", env) == "'v'"
