"""Steps: the Dockerfile rules both back ends rely on, applied once by the model (heredocs -> argv and
inline files, RUN --mount defaults, COPY destinations, which instructions change the filesystem)."""

from __future__ import annotations

import dataclasses

import pytest

from lazybuild.dockerfile.instructions import Workdir
from lazybuild.dockerfile.model import DockerfileError, load
from lazybuild.dockerfile.steps import (PIPES_DIR, BindMount, CacheMount, CopySource, CopyStep, InlineFile, RunStep,
                                        SecretMount, SshMount, TmpfsMount, WorkdirStep, copy_dest, parse_size)


def steps(text: str, **kwargs):
    return load(text, **kwargs).target.steps


def run(text: str) -> RunStep:
    step = steps("FROM x\n" + text)[-1]
    assert isinstance(step, RunStep)
    return step


# ---- heredocs


def test_heredoc_script_is_the_command():
    step = run("RUN <<EOF\necho $HOME\nEOF\n")
    assert step.argv == ("/bin/sh", "-c", "echo $HOME\n") and step.inline_files == ()


def test_heredoc_script_tabs_are_stripped_once():
    step = run("RUN <<-EOF\n\techo tabbed\n\t\tEOF\n")
    assert step.argv == ("/bin/sh", "-c", "echo tabbed\n")


def test_heredoc_with_interpreter_runs_as_a_file():
    step = run('RUN <<-EOF\n\t#!/usr/bin/env python3\n\tprint("hi")\n\tEOF\n')
    assert step.argv == (f"{PIPES_DIR}/EOF",)
    assert step.inline_files == (InlineFile("EOF", '#!/usr/bin/env python3\nprint("hi")\n', 0o755),)


def test_heredocs_fed_to_a_command_stay_in_the_script():
    # The shell reads them (and strips `<<-` tabs itself): the documents follow the command line.
    step = run("RUN cat <<A <<-B > /x\na $HOME\nA\n\tb\n\tB\n")
    assert step.argv == ("/bin/sh", "-c", "cat <<A <<-B > /x\na $HOME\nA\n\tb\nB")


def test_heredoc_script_uses_the_stage_shell():
    step = run('SHELL ["/bin/bash", "-ec"]\nRUN <<EOF\necho hi\nEOF\n')
    assert step.argv == ("/bin/bash", "-ec", "echo hi\n")


def test_copy_heredoc_is_chomped_then_expanded_once():
    (step,) = steps("FROM x\nENV WHO=world\nCOPY --chmod=0600 <<-EOF <<'RAW' /etc/\n\thello $WHO\n\tEOF\n"
                    "keep $WHO\nRAW\n")
    assert isinstance(step, CopyStep)
    assert step.files == (InlineFile("EOF", "hello world\n", 0o600), InlineFile("RAW", "keep $WHO\n", 0o600))
    assert step.sources == () and step.dest == "/etc/"


# ---- mounts


def test_mount_defaults_are_filled():
    step = run("WORKDIR /w\nRUN --mount=type=bind,target=ctx --mount=type=cache,target=/c "
               "--mount=type=tmpfs,target=/t,size=64m --mount=type=secret,id=tok "
               "--mount=type=ssh true\n")
    bind, cache, tmpfs, secret, ssh = step.mounts
    assert bind == BindMount("/w/ctx", "/", None, "", readonly=True)  # relative targets join WORKDIR
    assert cache == CacheMount("/c", "/c", "shared", False, None, "", "/", 0, 0, 0o755, owned=False)
    assert tmpfs == TmpfsMount("/t", 64 << 20)
    assert secret == SecretMount("/run/secrets/tok", "tok", "", False, 0, 0, 0o400)
    assert ssh == SshMount("/run/buildkit/ssh_agent.0", "default", False, 0, 0, 0o600)
    assert step.env[-1] == "SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0"  # the agent socket, as BuildKit sets it


def test_mount_sources_from_stages_and_images():
    b = load("FROM x AS tools\nFROM y\nRUN --mount=from=tools,source=bin,target=/t "
             "--mount=type=bind,from=alpine:3,target=/a,rw --mount=type=cache,target=/c,uid=1000,mode=0700 true\n")
    bind_stage, bind_image, cache = b.target.steps[0].mounts
    assert (bind_stage.from_stage, bind_stage.from_image, bind_stage.source) == (0, "", "/bin")
    assert (bind_image.from_stage, bind_image.from_image, bind_image.readonly) == (None, "alpine:3", False)
    assert (cache.uid, cache.gid, cache.mode, cache.owned) == (1000, 0, 0o700, True)
    assert b.target.depends_on == (0,)


def test_secret_named_by_its_target():
    (secret,) = run("RUN --mount=type=secret,target=/run/s/key,required true\n").mounts
    assert (secret.id, secret.target, secret.required) == ("key", "/run/s/key", True)


def test_run_flags_reach_the_step():
    step = run("USER app\nRUN --network=none --security=insecure true\n")
    assert (step.network, step.security, step.user, step.cwd) == ("none", "insecure", "app", "/")
    assert dataclasses.replace(run("RUN true\n")).network == "default"


def test_tmpfs_sizes():
    assert parse_size("1g") == 1 << 30 and parse_size("512KiB") == 512 << 10 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="invalid tmpfs size"):
        parse_size("lots")
    with pytest.raises(DockerfileError, match="invalid tmpfs size") as e:
        load("FROM x\nRUN --mount=type=tmpfs,target=/t,size=big true\n")
    assert e.value.start_line == 2


@pytest.mark.parametrize("text,message", [
    ('RUN ["sh", "-c", "cat"] <<EOF\nx\nEOF\n', None),  # heredocs are not parsed in the exec form
    ("RUN <<a/b\n#!/bin/sh\na/b\n", "is not a file name"),
    ("COPY http://example.com/f /f\n", "source can't be a URL for COPY"),
    ("COPY git@github.com:a/b.git /f\n", "source can't be a git reference for COPY"),
])
def test_step_errors_name_the_line(text, message):
    if message is None:
        load("FROM x\n" + text)
        return
    with pytest.raises(DockerfileError, match=message) as e:
        load("FROM x\n" + text)
    assert e.value.start_line == 2


# ---- COPY / ADD


def test_copy_destination_joins_workdir_once():
    assert copy_dest("/app", ".") == "/app/" and copy_dest("/app", "sub/") == "/app/sub/"
    assert copy_dest("/app", "f") == "/app/f" and copy_dest("/app", "/abs") == "/abs" and copy_dest("/", ".") == "/"


def test_add_sources_and_options():
    (step,) = steps("FROM x\nWORKDIR /w\nADD --checksum=sha256:abc --unpack=false --keep-git-dir=true "
                    "https://example.com/f.tgz git@github.com:a/b.git local.tar ./\n")[1:]
    assert step.is_add and step.dest == "/w/"
    assert step.sources == (CopySource("https://example.com/f.tgz", "url"), CopySource("git@github.com:a/b.git", "git"),
                            CopySource("local.tar", "path"))
    assert (step.unpack, step.checksum, step.keep_git_dir) == (False, "sha256:abc", True)
    (plain,) = steps("FROM x\nADD a.tar /\n")
    assert plain.unpack and not steps("FROM x\nCOPY a.tar /\n")[0].unpack


def test_copy_from_image_or_stage():
    b = load("FROM x AS a\nFROM y\nCOPY --from=a /p /q\nCOPY --from=alpine:3 --link --chown=1:2 /r /s\n")
    from_stage, from_image = b.target.steps
    assert (from_stage.from_stage, from_stage.from_image) == (0, "")
    assert (from_image.from_stage, from_image.from_image, from_image.link, from_image.chown) == (None, "alpine:3", True,
                                                                                                "1:2")
    assert from_image.sources == (CopySource("/r", "path"),)


# ---- which instructions are steps


def test_workdir_root_is_not_a_step():
    b = load("FROM x\nWORKDIR /\nWORKDIR /app\nWORKDIR ..\nUSER u\nWORKDIR data\nENV A=1\nRUN true\n")
    kinds = [(type(r.instruction).__name__, r.step is not None) for r in b.target.instructions]
    assert kinds == [("Workdir", False), ("Workdir", True), ("Workdir", False), ("User", False), ("Workdir", True),
                     ("Env", False), ("Run", True)]
    assert [s for s in b.target.steps if isinstance(s, WorkdirStep)] == [
        WorkdirStep(3, "WORKDIR /app", "/app", ""), WorkdirStep(6, "WORKDIR data", "/data", "u")]
    # The history agrees: a layer exactly where there is a step.
    layers = [not h.get("empty_layer") for h in b.target.history]
    assert layers == [r.step is not None for r in b.target.instructions]
    assert all(isinstance(r.instruction, Workdir) or r.instruction.keyword != "WORKDIR" for r in b.target.instructions)


def test_model_is_immutable():
    b = load("FROM x\nRUN true\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.target.steps[0].argv = ("false",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.target.name = "other"
