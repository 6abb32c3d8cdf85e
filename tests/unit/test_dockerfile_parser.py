"""BuildKit's own parser golden files (../shared/testdata/buildkit-dockerfile/parser, read where they lie),
plus cases of ours: heredocs, directives, errors with file:line."""

from __future__ import annotations

import os

import pytest

from lazybuild.dockerfile.parser import DockerfileError, parse

from support import SHARED

TESTDATA = os.path.join(SHARED,
                        "testdata", "buildkit-dockerfile", "parser")


def _cases(sub: str) -> list[str]:
    d = os.path.join(TESTDATA, sub)
    return sorted(os.listdir(d))


def _read(*parts: str) -> str:
    with open(os.path.join(TESTDATA, *parts), encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


@pytest.mark.parametrize("case", _cases("testfiles"))
def test_golden_parse(case):
    result = parse(_read("testfiles", case, "Dockerfile"))
    assert result.ast.dump() + "\n" == _read("testfiles", case, "result")


@pytest.mark.parametrize("case", _cases("testfiles-negative"))
def test_golden_negative(case):
    with pytest.raises(DockerfileError):
        parse(_read("testfiles-negative", case, "Dockerfile"))


def test_line_numbers():
    ast = parse(_read("testfile-line", "Dockerfile")).ast
    assert (ast.start_line, ast.end_line) == (5, 31)
    spans = [(c.start_line, c.end_line) for c in ast.children]
    assert spans == [(5, 5), (11, 12), (17, 31)]  # as upstream TestParseIncludesLineNumbers


def test_heredocs():
    text = "FROM busybox\nRUN <<EOF cat\nhello $X\nEOF\nCOPY <<-\"A\" /a <<B /b\n\t\tfirst\n\tA\nsecond\nB\nRUN [\"echo\", \"<<EOF\"]\n"
    ast = parse(text).ast
    run, copy, exec_run = ast.children[1], ast.children[2], ast.children[3]
    assert [(h.name, h.expand, h.chomp, h.content) for h in run.heredocs] == [("EOF", True, False, "hello $X\n")]
    assert [(h.name, h.expand, h.chomp) for h in copy.heredocs] == [("A", False, True), ("B", True, False)]
    assert copy.heredocs[0].content == "\t\tfirst\n" and copy.heredocs[1].content == "second\n"
    assert exec_run.heredocs == [] and exec_run.attributes["json"]
    assert (run.start_line, run.end_line) == (2, 4)
    with pytest.raises(DockerfileError, match=r"Dockerfile:2: unterminated heredoc"):
        parse("FROM x\nRUN <<EOF\nno end\n")


def test_directives_and_continuations():
    r = parse("# syntax=docker/dockerfile:1\n# check=skip=all\n# escape=`\nFROM x\nRUN a `\n\n  # comment\n  b\n")
    assert r.escape_token == "`" and [d.name for d in r.directives] == ["syntax", "check", "escape"]
    assert r.ast.children[1].dump() == 'run "a   b"' and len(r.warnings) == 1
    # a directive after a blank line is a comment; a repeated one is an error naming the line
    assert parse("\n# escape=`\nFROM x\n").escape_token == "\\"
    with pytest.raises(DockerfileError, match=r"Dockerfile:2: only one escape parser directive"):
        parse("# escape=`\n# escape=\\\nFROM x\n")
    with pytest.raises(DockerfileError, match="invalid escape token"):
        parse("# escape=x\nFROM x\n")


def test_errors_name_file_and_line():
    with pytest.raises(DockerfileError) as e:
        parse("FROM x\nENV \\\n  novalue\n", filename="app/Dockerfile")
    assert str(e.value) == "app/Dockerfile:2: ENV must have two arguments"
    with pytest.raises(DockerfileError, match="strings only"):
        parse('FROM x\nCMD ["a", 1]\n')
