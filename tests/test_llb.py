"""Dockerfile -> LLB without a daemon: the Definition's shape, digests, proto3 traps and cap gating.
(The same conversion is checked against a real BuildKit in test_frontend.py.)"""

from __future__ import annotations

import hashlib
import json

import pytest

from lazybuild.frontend.convert import BuildOptions, ConvertError, Converter
from lazybuild.dockerfile import model
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.frontend.gateway import Caps
from lazybuild.frontend.llb import builder
from lazybuild.frontend.llb.proto import ops_pb2 as pb

V08_LLB_CAPS = set("""constraints exec.cgroup exec.meta.base exec.meta.network exec.meta.proxyenv exec.meta.security
exec.meta.security.devices.v1 exec.meta.setsdefaultpath exec.mount.bind exec.mount.bind.readwrite-nooutput exec.mount.cache
exec.mount.cache.sharing exec.mount.secret exec.mount.selector exec.mount.ssh exec.mount.tmpfs file.base file.rm.wildcard
meta.description meta.exportcache meta.ignorecache platform soruce.http.uidgid source.buildop.llbfilename source.git
source.git.fullurl source.git.httpauth source.git.keepgitdir source.git.knownsshhosts source.git.mountsshsock source.http
source.http.checksum source.http.perm source.image source.image.resolvemode source.local source.local.excludepatterns
source.local.followpaths source.local.includepatterns source.local.sessionid source.local.sharedkeyhint
source.local.unique""".split())
AMD64 = pb.Platform(OS="linux", Architecture="amd64")


def convert(text: str, llb_caps=V08_LLB_CAPS, **opts) -> tuple[pb.Definition, model.Build]:
    build = model.load(text)
    caps = Caps(set(), set(llb_caps), [])
    conv = Converter(build, caps, BuildOptions(session_id="s1", **opts), {s.index: AMD64 for s in build.stages},
                     ShellLex(build.escape_token))
    states = conv.convert()
    return builder.definition(states[build.target.index]), build


def ops(d: pb.Definition) -> list[tuple[str, pb.Op]]:
    return [("sha256:" + hashlib.sha256(b).hexdigest(), pb.Op.FromString(b)) for b in getattr(d, "def")]


def test_definition_is_topological_with_terminal_last_and_exact_digests():
    d, _ = convert("FROM alpine AS a\nRUN echo a > /a\nFROM alpine\nCOPY --from=a /a /b\nRUN cat /b\n")
    seen = set()
    listed = ops(d)
    for digest, op in listed[:-1]:
        for i in op.inputs:
            assert i.digest in seen  # inputs come first
        seen.add(digest)
        assert digest in d.metadata
    terminal = listed[-1][1]
    assert len(terminal.inputs) == 1 and terminal.WhichOneof("op") is None and not terminal.HasField("platform")
    assert terminal.inputs[0].digest == listed[-2][0]
    # The same Dockerfile gives the same bytes, so BuildKit's cache recognises it.
    assert convert("FROM alpine AS a\nRUN echo a > /a\nFROM alpine\nCOPY --from=a /a /b\nRUN cat /b\n")[0] == d


def test_image_source_names_and_platform():
    d, _ = convert("FROM alpine:3.19\nRUN true\n")
    src = [op for _, op in ops(d) if op.WhichOneof("op") == "source"][0]
    assert src.source.identifier == "docker-image://docker.io/library/alpine:3.19"
    assert src.platform == AMD64 and src.HasField("constraints")


def test_copy_keeps_modes_and_times_and_chains_actions():
    d, _ = convert("FROM alpine\nWORKDIR /app\nCOPY --chown=app:1 a b sub/\n")
    fop = [op for _, op in ops(d) if op.WhichOneof("op") == "file" and op.file.actions[0].WhichOneof("action") == "copy"][0]
    a0, a1 = fop.file.actions
    assert (a0.copy.mode, a0.copy.timestamp) == (-1, -1)  # proto3 zero would mean chmod 000 / 1970
    assert a0.copy.src == "/a" and a0.copy.dest == "/app/sub/"
    assert a0.input == 0 and a0.output == -1 and a1.output == 0
    assert a1.input == len(fop.inputs)  # the result of action 0
    assert a0.copy.owner.user.byName.name == "app" and a0.copy.owner.group.byID == 1
    assert not fop.HasField("platform")  # file ops are not platform specific


def test_run_mounts_and_their_caps():
    d, _ = convert("FROM alpine\nRUN --mount=type=cache,target=/root/.cache --mount=type=secret,id=tok "
                   "--mount=type=tmpfs,target=/t --network=none make\n")
    digest, op = [(dg, op) for dg, op in ops(d) if op.WhichOneof("op") == "exec"][0]
    mounts = {m.dest: m for m in op.exec.mounts}
    assert op.exec.mounts[0].dest == "/" and op.exec.mounts[0].output == 0
    cache = mounts["/root/.cache"]
    assert cache.mountType == pb.CACHE and cache.cacheOpt.ID == "//root/.cache" and cache.output == -1
    secret = mounts["/run/secrets/tok"]
    assert secret.secretOpt.ID == "tok" and secret.secretOpt.mode == 0o400 and secret.secretOpt.optional
    assert mounts["/t"].mountType == pb.TMPFS
    assert op.exec.network == pb.NONE
    caps = set(d.metadata[digest].caps)
    assert {"exec.mount.cache", "exec.mount.secret", "exec.mount.tmpfs", "exec.meta.network"} <= caps


def test_context_sends_only_what_copy_reads_minus_dockerignore():
    d, _ = convert("FROM alpine\nCOPY src/ /src\nADD a.tar /x\n", excludes=["*.log"])
    local = [op for _, op in ops(d) if op.source.identifier == "local://context"][0]
    assert json.loads(local.source.attrs["local.followpaths"]) == ["a.tar", "src"]
    assert json.loads(local.source.attrs["local.excludepatterns"]) == ["*.log"]
    assert local.source.attrs["local.session"] == "s1"
    # A bind mount of the whole context needs all of it.
    d, _ = convert("FROM alpine\nRUN --mount=type=bind,target=/c ls /c\n")
    local = [op for _, op in ops(d) if op.source.identifier == "local://context"][0]
    assert "local.followpaths" not in local.source.attrs


def test_features_newer_than_the_daemon():
    with pytest.raises(ConvertError, match=r"Dockerfile:2: --exclude needs the BuildKit capability"):
        convert("FROM alpine\nCOPY --exclude=*.md . /x\n")
    # COPY --link without mergeop is a plain copy; with it, a merge of the copy onto the stage.
    d, _ = convert("FROM alpine\nCOPY --link a /a\n")
    assert not [op for _, op in ops(d) if op.WhichOneof("op") == "merge"]
    d, _ = convert("FROM alpine\nCOPY --link a /a\n", llb_caps=V08_LLB_CAPS | {"mergeop"})
    merge = [(dg, op) for dg, op in ops(d) if op.WhichOneof("op") == "merge"]
    assert len(merge) == 1 and len(merge[0][1].merge.inputs) == 2 and d.metadata[merge[0][0]].caps["mergeop"]


def test_heredoc_run_with_shebang_runs_as_a_mounted_file():
    d, _ = convert("FROM alpine\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n")
    ex = [op for _, op in ops(d) if op.WhichOneof("op") == "exec"][0]
    assert ex.exec.meta.args == ["/dev/pipes/EOF"]
    pipes = [m for m in ex.exec.mounts if m.dest == "/dev/pipes/"][0]
    assert pipes.readonly and pipes.output == -1


def test_input_definition_keeps_its_bytes():
    d, _ = convert("FROM alpine\nRUN true\n")
    out = builder.from_definition(d)
    again = builder.definition(out)
    assert list(getattr(again, "def"))[:-1] == list(getattr(d, "def"))[:-1]
