"""What every command shares: the error prefix and exit code of bad input, --format json, --progress,
--debug / --log-level, shell completion, missing extras, and README's command reference (issue 16)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import pytest

from support import tarcases

import lazybuild.cli
from lazybuild import __version__
from lazybuild.cli import output, progress
from lazybuild.cli.options import walk_commands

ENV = {**os.environ, "CI": "1"}


def cli(*args, env=None, code=None):
    """`python3 -m lazybuild.cli ARGS` (the checkout under test); CODE, if given, is the exit status wanted."""
    p = subprocess.run([sys.executable, "-m", "lazybuild.cli", *args], capture_output=True, text=True,
                       env=env or ENV)
    if code is not None:
        assert p.returncode == code, p.stderr
    return p


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory):
    return tarcases.ustar_all_types(str(tmp_path_factory.mktemp("conventions") / "in.tar"))


@pytest.fixture(scope="module")
def blob(layer_tar, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("blob") / "layer.blob")
    cli("layer", "convert", layer_tar, out, code=0)
    return out


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = lazybuild.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- One error prefix, one hint, an exit code per class -------------------------------------------------

def bad_inputs(tmp_path, blob):
    """(argv, exit code, words the error must have) for bad input across commands."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a layer" * 20)
    bad_dockerfile = tmp_path / "bad"
    bad_dockerfile.mkdir()
    (bad_dockerfile / "Dockerfile").write_text("FROM scratch\nFROBNICATE now\n")
    state = str(tmp_path / "state")
    return [
        (["nosuch"], 2, "invalid choice: 'nosuch'"),
        ([], 2, "required: COMMAND"),
        (["layer"], 2, "required"),
        (["layer", "convert"], 2, "required: IN.tar, OUT"),
        (["layer", "ls", "--bogus", blob], 2, "unrecognized arguments: --bogus"),
        (["--format", "yaml", "version"], 2, "--format: invalid choice: 'yaml'"),
        (["version", "--format", "xml"], 2, "--format: invalid choice: 'xml'"),
        (["build", "--progress", "fancy", str(tmp_path)], 2, "--progress: invalid choice: 'fancy'"),
        (["layer", "convert", "--chunk-size", "4XB", "a", "b"], 2, "'4XB' is not a size"),
        (["--log-level", "loud", "version"], 2, "--log-level: invalid choice: 'loud'"),
        (["completion", "fish"], 2, "invalid choice: 'fish'"),
        (["-q", "version"], 2, "unrecognized arguments: -q"),
        (["version", "extra"], 2, "unrecognized arguments: extra"),
        (["build", "--secret", "id=x", str(tmp_path)], 2, "--secret"),
        (["layer", "ls", str(tmp_path / "missing")], 1, "No such file"),
        (["layer", "verify", str(junk)], 1, str(junk)),
        (["inspect-dockerfile", str(tmp_path / "nowhere")], 1, "No such file"),
        (["inspect-dockerfile", str(bad_dockerfile)], 1, "Dockerfile:2"),
        (["profile", "rm", "sha256:../../etc/shadow", "--state-dir", state], 1, "digest"),
        (["profile", "show", "sha256:" + "0" * 64, "--state-dir", state], 1, "no local profile"),
        (["inspect", "Not/A/Reference"], 1, "lowercase"),
        (["inspect", "127.0.0.1:9/x"], 3, "127.0.0.1:9"),  # the discard port: nothing listens
    ]


def test_bad_input_is_one_error_line_a_hint_and_the_exit_code_of_its_class(capsys, tmp_path, blob):
    cases = bad_inputs(tmp_path, blob)
    assert len(cases) >= 20
    for argv, want_code, words in cases:
        code, out, err = run_main(capsys, *argv)
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("lazybuild: error: ")]
        assert code == want_code and out == "", (argv, code, err)
        assert "Traceback" not in err and len(errors) == 1 and words in errors[0], (argv, err)
        assert all(line.startswith("lazybuild: ") for line in lines), (argv, err)  # no argparse usage text
        if "No such file" in words:  # a file the system refused: the message says it all
            continue
        hint = lines[lines.index(errors[0]) + 1]
        assert hint.startswith("lazybuild: hint: "), (argv, err)
        if want_code == 2 and argv[:1] == ["layer"] and len(argv) > 2:  # the command's own --help is named
            assert f"lazybuild layer {argv[1]} --help" in hint, err


def test_usage_errors_through_the_console_script(tmp_path):
    p = cli("layer", "ls", "--nope", "x", code=2)
    assert p.stderr.splitlines() == ["lazybuild: error: unrecognized arguments: --nope",
                                     "lazybuild: hint: see `lazybuild layer ls --help`"]
    assert p.stdout == ""


def test_help_and_version_exit_0(capsys):
    code, out, _ = run_main(capsys, "layer", "convert", "--help")
    assert code == 0 and "global options" in out and "--progress" in out
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.startswith("lazybuild ")


# --- --format json: one JSON document for every command that runs without services ----------------------

def test_format_json_is_one_document(capsys, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian:sid AS build\nRUN make\nFROM scratch\nCOPY --from=build /a /a\n")
    state = str(tmp_path / "state")
    for argv, check in (
        (["version"], lambda d: d["version"] == __version__),
        (["inspect-dockerfile", str(tmp_path)], lambda d: len(d["stages"]) == 2 and d["target"] == 1),
        (["profile", "ls", "--state-dir", state], lambda d: d == []),
    ):
        for where in ("before", "after"):  # a global option: before the command name or after it
            args = ["--format", "json", *argv] if where == "before" else [*argv, "--format", "json"]
            code, out, err = run_main(capsys, *args)
            assert code == 0, err
            assert check(json.loads(out)), out


def test_format_json_of_layers_and_local_images(capsys, tmp_path, blob):
    """layer convert/verify/ls and copy/inspect of local images: one JSON document, text by default, -q."""
    from lazybuild.testing.images import docker_archive

    layer_tar = tarcases.ustar_all_types(str(tmp_path / "in.tar"))
    code, out, _ = run_main(capsys, "layer", "convert", "--format", "json", layer_tar, str(tmp_path / "b"))
    converted = json.loads(out)
    assert code == 0 and converted["digest"].startswith("sha256:") and converted["tocDigest"].startswith("sha256:")
    code, out, _ = run_main(capsys, "layer", "convert", "-q", layer_tar, str(tmp_path / "c"))
    assert code == 0 and out == converted["digest"] + "\n"
    code, out, _ = run_main(capsys, "layer", "convert", layer_tar, str(tmp_path / "d"))
    assert code == 0 and out.startswith(converted["digest"]) and "TOC digest" in out
    code, out, _ = run_main(capsys, "layer", "verify", "--format", "json", blob)
    assert code == 0 and json.loads(out)["filesVerified"] > 0
    code, out, _ = run_main(capsys, "layer", "ls", "--format", "json", "--chunks", blob)
    entries = json.loads(out)
    assert code == 0 and isinstance(entries, list) and any(e["path"] == "etc/hello.txt" for e in entries)
    code, out, err = run_main(capsys, "layer", "ls", "--json", blob)  # the deprecated spelling: the same array
    assert code == 0 and json.loads(out) == [e for e in entries if e["type"] != "chunk"]
    assert err == "lazybuild: warning: --json is deprecated: use --format json\n"
    code, out, _ = run_main(capsys, "layer", "ls", blob)
    assert code == 0 and any(line.endswith("etc/sl -> hello.txt") for line in out.splitlines())

    archive = docker_archive([layer_tar], str(tmp_path / "img.tar"), tag="app:v1")
    code, out, _ = run_main(capsys, "copy", "--format", "json", f"docker-archive:{archive}", f"oci:{tmp_path}/l:v1")
    copied = json.loads(out)
    assert code == 0 and copied["destination"] == f"oci:{tmp_path}/l:v1"
    code, out, _ = run_main(capsys, "copy", "-q", f"docker-archive:{archive}", f"oci:{tmp_path}/m:v1")
    assert code == 0 and out == copied["digest"] + "\n"
    code, out, _ = run_main(capsys, "inspect", f"oci:{tmp_path}/l:v1")
    assert code == 0 and out.startswith(f"oci:{tmp_path}/l:v1\n  digest    {copied['digest']}") and "1 layers" in out
    code, out, _ = run_main(capsys, "inspect", f"oci:{tmp_path}/l:v1", "--format", "json")
    assert code == 0 and json.loads(out)["digest"] == copied["digest"]


def test_text_is_the_default_and_quiet_prints_the_primary_value(capsys, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY a /a\n")
    code, out, _ = run_main(capsys, "inspect-dockerfile", str(tmp_path))
    assert code == 0 and out.startswith("target ") and "COPY a /a" in out
    code, out, _ = run_main(capsys, "version")
    assert code == 0 and out.startswith("lazybuild ")


def test_the_deprecated_json_flag_says_so_once(capsys, tmp_path):
    code, out, err = run_main(capsys, "profile", "ls", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and json.loads(out) == []
    assert err.splitlines() == ["lazybuild: warning: --json is deprecated: use --format json"]


def test_emit(capsys):
    result = output.Result({"digest": "sha256:1"}, "the text", primary="sha256:1")
    output.emit(argparse.Namespace(output_format="text", quiet=False), result)
    output.emit(argparse.Namespace(output_format="json", quiet=False), result)
    output.emit(argparse.Namespace(output_format="json", quiet=True), result)
    output.emit(argparse.Namespace(output_format="text", quiet=True), output.Result([], ""))  # no primary, no text
    out = capsys.readouterr().out
    assert out == 'the text\n{\n  "digest": "sha256:1"\n}\nsha256:1\n'


def test_listing_streams_text_and_collects_json(capsys):
    for fmt, want in (("text", "a\nb\n"), ("json", '[\n  {\n    "n": 1\n  },\n  {\n    "n": 2\n  }\n]\n')):
        with output.Listing(argparse.Namespace(output_format=fmt)) as listing:
            listing.add({"n": 1}, "a")
            listing.add({"n": 2}, "b")
        assert capsys.readouterr().out == want
    with output.Listing(argparse.Namespace(output_format="json")) as listing:
        pass
    assert capsys.readouterr().out == "[]\n"


def test_build_result_metadata_and_progress(tmp_path, monkeypatch):
    """A build from scratch (no registry, no RUN): the digest in text, -q, the metadata document with
    buildx's keys in --format json and in --metadata-file, for an image and for a local output."""
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "a.txt").write_text("hello\n")
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
    env = {**ENV, "LAZYBUILD_STATE": str(tmp_path / "state"), "LAZYBUILD_CACHE": str(tmp_path / "cache")}
    ctx, out, meta = str(tmp_path / "ctx"), str(tmp_path / "oci"), str(tmp_path / "meta.json")
    p = cli("build", ctx, "-o", f"type=oci,dest={out}", "-t", "example.com/app:1", "--metadata-file", meta,
            env=env, code=0)
    digest = p.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71 and "[stage-0 1/1] COPY a.txt /a.txt" in p.stderr
    written = json.load(open(meta))
    assert written["containerimage.digest"] == digest and written["image.name"] == "example.com/app:1"
    assert written["containerimage.descriptor"]["digest"] == digest
    assert written["containerimage.config.digest"].startswith("sha256:") and "bytesFetched" in written
    p = cli("build", ctx, "-o", f"type=oci,dest={out}", "--format", "json", "--progress", "rawjson", env=env, code=0)
    document = json.loads(p.stdout)  # a new digest: the config's `created` is the build's time
    assert document["containerimage.digest"] == document["containerimage.descriptor"]["digest"] != digest
    events = [json.loads(line) for line in p.stderr.splitlines()]
    assert any(e.get("message", "").startswith("[stage-0 1/1] COPY") for e in events)
    p = cli("build", ctx, "-o", f"type=oci,dest={out}", "-q", "--progress", "quiet", env=env, code=0)
    assert p.stdout.startswith("sha256:") and len(p.stdout) == 72 and p.stderr == ""
    p = cli("build", ctx, "-o", f"type=local,dest={tmp_path / 'root'}", "--metadata-file", meta, env=env, code=0)
    assert p.stdout == "" and (tmp_path / "root" / "a.txt").read_text() == "hello\n"
    assert set(json.load(open(meta))) == {"bytesFetched"}


def test_texts_for_people():
    from lazybuild.cli import texts

    doc = {"reference": "127.0.0.1:5000/app:1", "digest": "sha256:" + "a" * 64,
           "config": {"os": "linux", "architecture": "arm64", "created": "2026-01-01T00:00:00Z"},
           "manifest": {"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 4 << 20,
                                    "digest": "sha256:" + "b" * 64,
                                    "annotations": {"containerd.io/snapshot/stargz/toc.digest": "sha256:c"}}]}}
    lines = texts.image(doc).splitlines()
    assert lines[:3] == ["127.0.0.1:5000/app:1", "  digest    sha256:" + "a" * 64, "  platform  linux/arm64"]
    assert lines[-1].split() == ["4", "MiB", "eStargz", "tar+gzip", "sha256:" + "b" * 64]
    status = {"mountpoint": "/mnt", "pid": 7, "layers": [{"digest": "sha256:d", "size": 2048, "fetchedBytes": 1024,
                                                          "fetchedPercent": 50.0}]}
    assert texts.mount_status(status) == "/mnt (pid 7)\n  sha256:d  1 KiB of 2 KiB fetched (50.0%)"
    assert texts.copied({"source": "a", "destination": "oci:b", "digest": "sha256:e"}) == "a -> oci:b\n  digest  sha256:e"


# --- --progress ---------------------------------------------------------------------------------------

def test_progress_tty_draws_bars_into_a_file_even_in_ci(layer_tar, tmp_path):
    p = cli("layer", "convert", layer_tar, str(tmp_path / "o"), "--progress", "tty", code=0)
    assert "in.tar: 100%|" in p.stderr and "█" in p.stderr, p.stderr


def test_progress_modes(layer_tar, tmp_path):
    p = cli("layer", "convert", layer_tar, str(tmp_path / "o"), "--progress", "rawjson", code=0)
    events = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    assert len(events) >= 2 and all(e["label"] == "in.tar" and e["total"] > 0 for e in events)
    assert events[-1]["done"] is True and events[-1]["current"] > 0 and "done" not in events[0]
    p = cli("layer", "convert", layer_tar, str(tmp_path / "o"), "--progress", "plain", code=0)
    assert any(line.startswith("lazybuild: in.tar: ") and line.endswith(" done") for line in p.stderr.splitlines())
    assert "\r" not in p.stderr
    p = cli("layer", "convert", layer_tar, str(tmp_path / "o"), "--progress", "quiet", code=0)
    assert "in.tar" not in p.stderr
    p = cli("layer", "convert", layer_tar, str(tmp_path / "o"), code=0)  # auto in CI, stderr a pipe: plain
    assert "\r" not in p.stderr and " done" in p.stderr


def test_auto_is_plain_off_a_terminal_or_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert progress.resolve("auto") == "plain" and progress.resolve("tty") == "tty"
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.resolve("auto") == "tty"


# --- --debug and --log-level on every command --------------------------------------------------------

def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        if action.nargs in ("?", "*", argparse.REMAINDER):
            continue
        out.append(str(next(iter(action.choices))) if action.choices else "x")
    return out


def test_every_command_takes_debug_and_log_level_before_and_after_its_name():
    parser = lazybuild.cli.build_parser()
    leaves = [(path, p) for path, p in walk_commands(parser) if path and not any(
        isinstance(a, argparse._SubParsersAction) for a in p._actions)]
    assert len(leaves) >= 18
    for path, p in leaves:
        words = [*path.split(), *_positionals(p)]
        args = parser.parse_args([*words, "--debug", "--log-level", "warning", "--format", "json"])
        assert (args.debug, args.log_level, args.output_format) == (True, "warning", "json"), path
        args = parser.parse_args(["--log-level", "error", "--debug", *words])
        assert (args.debug, args.log_level, args.output_format) == (True, "error", "text"), path
        args = parser.parse_args(["--log-level", "error", *words, "--log-level", "debug"])
        assert args.log_level == "debug", path  # after the name wins, as it comes last
        args = parser.parse_args(words)
        assert (args.debug, args.log_level, args.progress, args.quiet) == (False, "info", "auto", False), path


def test_messages_go_to_stderr_in_lazybuilds_words(capsys):
    try:
        output.configure_logging("info")
        logging.getLogger("lazybuild.mount").info("mounted")
        logging.getLogger("lazybuild.mount").debug("not shown")
        logging.getLogger("lazybuild.registry").warning("slow")
        assert capsys.readouterr() == ("", "lazybuild: mounted\nlazybuild: warning: slow\n")
        output.configure_logging("warning")
        logging.getLogger("lazybuild.mount").info("not shown")
        assert capsys.readouterr().err == ""
        output.configure_logging("info", debug=True)
        logging.getLogger("lazybuild.mount").debug("fetched")
        logging.getLogger("lazybuild.mount").info("mounted")
        assert capsys.readouterr().err == ("lazybuild: debug: lazybuild.mount: fetched\n"
                                           "lazybuild: lazybuild.mount: mounted\n")
    finally:
        output.configure_logging("warning")


# --- completion ----------------------------------------------------------------------------------------

def _complete(script: str, *words: str) -> list[str]:
    """What bash's completion function offers for the command line WORDS (the last one being typed)."""
    words_text = " ".join(f"'{w}'" for w in words)
    code = f'{script}\nCOMP_WORDS=({words_text}); COMP_CWORD={len(words) - 1}; _lazybuild; echo "${{COMPREPLY[@]}}"'
    p = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True)
    return p.stdout.split()


def test_bash_completion_completes_commands_options_and_choices():
    p = cli("completion", "bash", code=0)
    script = p.stdout
    assert "complete -o default -F _lazybuild lazybuild" in script
    assert _complete(script, "lazybuild", "la") == ["layer"]
    assert _complete(script, "lazybuild", "layer", "v") == ["verify"]
    assert _complete(script, "lazybuild", "--debug", "layer", "e") == ["extract"]
    assert _complete(script, "lazybuild", "build", "--no-c") == ["--no-cache"]
    assert _complete(script, "lazybuild", "build", "--progress", "t") == ["tty"]
    assert _complete(script, "lazybuild", "--format", "j") == ["json"]
    assert "--format" in _complete(script, "lazybuild", "profile", "ls", "--")
    assert _complete(script, "lazybuild", "completion", "") == []  # SHELL: choices come after options only
    p = subprocess.run(["bash", "-c", f"{script}\ncomplete -p lazybuild"], capture_output=True, text=True)
    assert p.stdout.strip() == "complete -o default -F _lazybuild lazybuild", p.stderr


# An interactive zsh in a pseudo-terminal (zsh/zpty): type `lazybuild la`, TAB, then run `echo` on the line
# the completion left, so the completed words come back as output.
ZSH_SESSION = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z 'PS1="> "; autoload -U compinit; compinit -u; source {script}; echo READY'
zpty -r z line '*READY*'
zpty -w -n z $'lazybuild {typed}\t'
sleep 1
zpty -w -n z $'\x01echo COMPLETED: \x05\n'
sleep 1
out=""
while zpty -r -t z chunk 2>/dev/null; do out+=$chunk; done
print -r -- "$out"
zpty -d z
"""


def test_zsh_completion_completes_through_bashcompinit(tmp_path):
    script = cli("completion", "zsh", code=0).stdout
    assert "bashcompinit" in script and "_lazybuild_commands()" in script
    assert script.split("bashcompinit\n", 1)[1] == cli("completion", "bash", code=0).stdout.split("\n", 2)[2]
    (tmp_path / "lazybuild.zsh").write_text(script)
    for typed, completed in (("la", "layer"), ("layer v", "layer verify"), ("build --progr", "build --progress")):
        session = ZSH_SESSION.format(script=tmp_path / "lazybuild.zsh", typed=typed)
        p = subprocess.run(["zsh", "-f", "-c", session], capture_output=True, text=True, timeout=60)
        lines = [line.strip() for line in p.stdout.replace("\r", "").splitlines()]
        assert f"COMPLETED: lazybuild {completed}" in lines, p.stdout


# --- A missing optional module names the extra ---------------------------------------------------------

def _main_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # `import MODULE` fails as if not installed
            f"from lazybuild.cli import main; sys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)


def test_a_missing_extra_or_dependency_is_named(tmp_path, layer_tar):
    p = _main_without("pyfuse3", "mount", "127.0.0.1:9/x", str(tmp_path))
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("lazybuild: error: lazybuild mount needs pyfuse3, from the 'mount' extra")
    assert "install it with: pip install 'lazybuild[mount]'" in p.stderr
    p = _main_without("tqdm", "layer", "convert", layer_tar, str(tmp_path / "o"), "--progress", "tty")
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    assert "needs tqdm, which lazybuild depends on" in p.stderr and "reinstall lazybuild" in p.stderr
    p = _main_without("pyfuse3", "optimize", "oci:" + str(tmp_path / "none"), "oci:" + str(tmp_path / "o"), "--", "true")
    assert p.returncode == 5 and p.stderr.startswith("lazybuild: error: lazybuild optimize needs pyfuse3"), p.stderr


# --- README's command reference ------------------------------------------------------------------------

def test_readme_command_reference_is_written_from_the_parsers():
    p = subprocess.run([sys.executable, "-m", "lazybuild.cli.reference", "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    for path, _ in walk_commands(lazybuild.cli.build_parser()):
        if path:
            assert f"### `lazybuild {path}`" in readme
