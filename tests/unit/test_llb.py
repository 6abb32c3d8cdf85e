"""Dockerfile -> LLB without a daemon: the builder's states and digests, the Definition's shape, proto3
traps and cap gating. (The same conversion is checked against a real BuildKit in test_frontend.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from lazybuild.frontend.convert import BuildOptions, ConvertError, Converter
from lazybuild.dockerfile import model
from lazybuild.dockerfile.dockerignore import read_patterns
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.frontend.gateway import Caps
from lazybuild.frontend.llb import builder
from lazybuild.frontend.llb import builder as llb
from lazybuild.frontend.llb.proto import ops_pb2 as pb
from support import CORPUS

# What each daemon answers Ping with, from upstream's caps.go at each tag (tests/data/buildkit_caps.json):
# v0.8.3 is Docker 20.10's BuildKit (checked against the real daemon in test_frontend.py), v0.11.6 a current one.
with open(os.path.join(os.path.dirname(CORPUS), "buildkit_caps.json")) as _f:
    BUILDKIT_CAPS = {tag: {kind: set(caps) for kind, caps in lists.items()}
                     for tag, lists in json.load(_f).items() if not tag.startswith("_")}
V08_LLB_CAPS = BUILDKIT_CAPS["v0.8.3"]["llb"]
V011_LLB_CAPS = BUILDKIT_CAPS["v0.11.6"]["llb"]
AMD64 = pb.Platform(OS="linux", Architecture="amd64")


def convert(text: str, llb_caps=V08_LLB_CAPS, build_args=None, target="", **opts) -> tuple[pb.Definition, model.Build]:
    build = model.load(text, build_args=build_args or {}, target=target)
    caps = Caps(set(), set(llb_caps), [])
    conv = Converter(build, caps, BuildOptions(session_id="s1", **opts), {s.index: AMD64 for s in build.stages},
                     ShellLex(build.escape_token))
    states = conv.convert()
    return builder.definition(states[build.target.index]), build


def ops_of(d: pb.Definition) -> list[pb.Op]:
    return [pb.Op.FromString(b) for b in getattr(d, "def")]


ALPINE = llb.image("docker.io/library/alpine:latest", platform=AMD64)
CONTEXT = llb.local("context", session_id="s1", shared_key_hint="context")


# ---- the builder
def test_states_are_immutable_values():
    built = ALPINE.run(["true"]).root()
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.index = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.op.args = ("false",)
    # Building on a state leaves it as it was: both branches share it.
    before = llb.definition(ALPINE)
    a = ALPINE.file(llb.Mkdir("/a"))
    b = ALPINE.file(llb.Mkdir("/b"))
    assert llb.definition(ALPINE) == before
    assert a.op.inputs == b.op.inputs == (ALPINE,)


def test_digest_is_sha256_of_the_exact_bytes_and_stable():
    def graph():
        base = llb.image("docker.io/library/alpine:latest", platform=AMD64)
        run = base.run(["sh", "-c", "make"], env=["A=1"], mounts=[llb.Cache("/c", id="/c")]).root()
        return llb.merge([base, run.file(llb.Copy(CONTEXT, "/a", "/b", mode=0o600))])

    d1, d2 = llb.definition(graph()), llb.definition(graph())
    assert d1 == d2 and d1.SerializeToString(deterministic=True) == d2.SerializeToString(deterministic=True)
    for data in getattr(d1, "def")[:-1]:
        assert "sha256:" + hashlib.sha256(data).hexdigest() in d1.metadata
    # Inputs are named by digest: a change deep in the graph changes every op after it.
    changed = llb.merge([ALPINE, ALPINE.run(["sh", "-c", "make"], env=["A=2"]).root()])
    assert graph().op.digest != changed.op.digest


def test_each_op_declares_the_caps_it_uses():
    def caps(state):
        return set(llb.definition(state).metadata[state.op.digest].caps)

    assert caps(ALPINE) == {"source.image"}
    assert caps(llb.image("docker.io/library/alpine:latest", resolve_mode="pull")) == {"source.image",
                                                                                         "source.image.resolvemode"}
    assert caps(CONTEXT) == {"source.local", "source.local.sessionid", "source.local.sharedkeyhint"}
    assert "source.git.subdir" in caps(llb.git("github.com/x/y.git", "main:sub", full_url="https://github.com/x/y.git"))
    assert caps(llb.http("https://h/f", filename="f", checksum="sha256:" + "0" * 64)) == {"source.http",
                                                                                          "source.http.checksum"}
    assert caps(ALPINE.run(["true"]).root()) == {"exec.meta.base", "exec.mount.bind"}
    run = ALPINE.run(["true"], network="none", insecure=True, proxy_env=llb.ProxyEnv(http_proxy="http://p"), mounts=[
        llb.Cache("/c", id="c", sharing="locked"), llb.Tmpfs("/t", size_bytes=1 << 20), llb.Secret("/s", id="s"),
        llb.SSH("/k"), llb.Bind("/rw", CONTEXT, selector="/sub")]).root()
    assert caps(run) == {"exec.meta.base", "exec.mount.bind", "exec.meta.network", "exec.meta.security",
                         "exec.meta.proxyenv", "exec.mount.cache", "exec.mount.cache.sharing", "exec.mount.tmpfs",
                         "exec.mount.tmpfs.size", "exec.mount.secret", "exec.mount.ssh", "exec.mount.selector",
                         "exec.mount.bind.readwrite-nooutput"}
    assert caps(ALPINE.file(llb.Copy(CONTEXT, "/", "/x", exclude=("*.md",), mode_str="u+x"))) == {
        "file.base", "file.copy.includeexcludepatterns", "file.copy.modestring"}
    assert caps(ALPINE.file(llb.Rm("/tmp/*", allow_wildcard=True))) == {"file.base", "file.rm.wildcard"}
    assert caps(llb.merge([ALPINE, CONTEXT])) == {"mergeop"}
    assert caps(llb.diff(ALPINE, llb.merge([ALPINE, CONTEXT]))) == {"diffop"}
    # The Definition as a whole: on the terminal op.
    d = llb.definition(ALPINE.run(["true"], info=llb.Info("step", ignore_cache=True)).root())
    terminal = "sha256:" + hashlib.sha256(getattr(d, "def")[-1]).hexdigest()
    assert set(d.metadata[terminal].caps) == {"constraints", "platform", "meta.description", "meta.ignorecache"}


def test_exec_numbers_inputs_and_outputs_in_mount_order():
    extra = llb.scratch().file(llb.Mkfile("/f", b"x"))
    run = ALPINE.run(["true"], mounts=[llb.Bind("/pre", extra, readonly=True), llb.ROOT,
                                        llb.Bind("/out", output=True), llb.Bind("/in", CONTEXT, readonly=True)])
    op = pb.Op.FromString(run.op.data)
    assert [i.digest for i in op.inputs] == [extra.op.digest, ALPINE.op.digest, CONTEXT.op.digest]
    mounts = {m.dest: m for m in op.exec.mounts}
    assert [m.dest for m in op.exec.mounts] == sorted(mounts)  # written sorted, as BuildKit expects
    assert (mounts["/"].input, mounts["/"].output) == (1, 0)
    assert (mounts["/out"].input, mounts["/out"].output) == (-1, 1)  # scratch, and the op's second output
    assert (mounts["/pre"].output, mounts["/in"].input) == (-1, 2)  # proto3: -1, not 0, for "no output"
    assert run.root() == llb.State(run.op, 0) and run.mount_output("/out") == llb.State(run.op, 1)
    with pytest.raises(KeyError):
        run.mount_output("/in")
    # Without ROOT listed, the root comes first.
    plain = pb.Op.FromString(ALPINE.run(["true"], mounts=[llb.Bind("/in", CONTEXT)]).op.data)
    assert [i.digest for i in plain.inputs] == [ALPINE.op.digest, CONTEXT.op.digest]


def test_file_actions_chain_and_keep_proto3_traps_explicit():
    st = ALPINE.file(llb.Mkdir("/app", make_parents=True, owner=llb.Chown("app", 0)),
                     llb.Mkfile("/app/f", b"hi", mode=0o600),
                     llb.Copy(CONTEXT, "/src", "/app/", owner=llb.Chown(1000)),
                     llb.Rm("/app/tmp", allow_not_found=True))
    op = pb.Op.FromString(st.op.data)
    mkdir, mkfile, copy, rm = op.file.actions
    assert [i.digest for i in op.inputs] == [ALPINE.op.digest, CONTEXT.op.digest]
    assert [a.input for a in op.file.actions] == [0, 2, 3, 4]  # then the results of actions 0, 1, 2
    assert [a.secondaryInput for a in op.file.actions] == [-1, -1, 1, -1]
    assert [a.output for a in op.file.actions] == [-1, -1, -1, 0]
    assert mkdir.mkdir.owner.user.byName.name == "app" and mkdir.mkdir.owner.user.byName.input == 0
    assert mkdir.mkdir.owner.group.HasField("byID")  # id 0 is written, not left out
    assert (copy.copy.mode, copy.copy.timestamp, mkfile.mkfile.timestamp) == (-1, -1, -1)
    assert not op.HasField("platform") and op.HasField("constraints")
    with pytest.raises(ValueError):
        ALPINE.file()


def test_merge_and_diff():
    assert llb.merge([llb.scratch(), llb.scratch()]).is_scratch
    one = pb.Op.FromString(llb.merge([llb.scratch(), CONTEXT]).op.data)
    assert [m.input for m in one.merge.inputs] == [0]
    both = pb.Op.FromString(llb.merge([ALPINE, CONTEXT, ALPINE]).op.data)
    assert [m.input for m in both.merge.inputs] == [0, 1, 0] and len(both.inputs) == 2
    d = pb.Op.FromString(llb.diff(llb.scratch(), ALPINE).op.data)
    assert (d.diff.lower.input, d.diff.upper.input) == (-1, 0)


def test_identical_ops_are_one_vertex_with_merged_metadata():
    a = ALPINE.run(["true"], info=llb.Info("first")).root()
    b = ALPINE.run(["true"], info=llb.Info("first", ignore_cache=True)).root()
    assert a.op.digest == b.op.digest
    d = llb.definition(llb.merge([a.file(llb.Mkdir("/x")), b.file(llb.Mkdir("/y"))]))
    assert len(getattr(d, "def")) == 6  # image, run (once), two mkdirs, merge, terminal
    assert d.metadata[a.op.digest].ignore_cache


def test_bad_values_are_refused_when_built():
    with pytest.raises(ValueError, match="network mode"):
        ALPINE.run(["true"], network="bridge")
    with pytest.raises(ValueError, match="cache sharing"):
        llb.Cache("/c", id="c", sharing="sometimes")


# ---- the Dockerfile converter
def corpus_cases() -> list[tuple[str, str, dict, str, list[str]]]:
    cases = []
    for case in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, case, "Dockerfile")) as f:
            text = f.read()
        meta_path = os.path.join(CORPUS, case, "case.json")
        args = json.load(open(meta_path)).get("args", []) if os.path.exists(meta_path) else []
        build_args = dict(a.split("=", 1) for flag, a in zip(args, args[1:]) if flag == "--build-arg")
        target = next((a for flag, a in zip(args, args[1:]) if flag == "--target"), "")
        ignore = os.path.join(CORPUS, case, ".dockerignore")
        excludes = read_patterns(open(ignore).read()) if os.path.exists(ignore) else []
        cases.append((case, text, build_args, target, excludes))
    return cases


# The digest of each corpus build's result as this frontend has always written it. BuildKit's cache is
# keyed on these: a change here means every user's cache misses once. Change them only on purpose.
CORPUS_DIGESTS = {
    "01-multistage-copy-from": "sha256:f67dd5ead470a65e5c89f5bee93584f87c842252973a82dab974cbdc1beda144",
    "02-arg-scoping": "sha256:d1b40a1ebec01c5ac1f8664e98af3ef271b66cd0e2b7efc1a5a2a173400f8ed2",
    "03-variable-forms": "sha256:4d230d5c0fc9e1ffd8527d9ca43aaa7f20f3c0dca87af8b42e0e84828f0a35bc",
    "04-heredoc-run": "sha256:00bc521d90f2a6d0a15e2face52f5ce3b04abcf7640b2235e5c2c5c623f3accb",
    "05-copy-chown-chmod": "sha256:c09a6da57aa113ae2729dbaee7acc9880349ee56c2d411cb01dd943739bada91",
    "06-copy-wildcards": "sha256:5f90fa353ba7f8cadfaa8d05f86f91142331b7ae0f74a062e8ce46bf74b32193",
    "07-workdir-user-env": "sha256:e12223e11c010aaeaf60113efc2122e11bd2343cd4d22a53dee7554c31288d11",
    "08-cmd-entrypoint": "sha256:47cc6f2b9191d72b3c093a58ed93730e9f48e45e7b8580b37f83a7025f17fd7c",
    "09-shell": "sha256:0cbb8cb11ca07156df5713d8c16034e43b064b203cfbc9ef9a25fd369c30711d",
    "10-metadata": "sha256:47cc6f2b9191d72b3c093a58ed93730e9f48e45e7b8580b37f83a7025f17fd7c",
    "11-healthcheck-none": "sha256:47cc6f2b9191d72b3c093a58ed93730e9f48e45e7b8580b37f83a7025f17fd7c",
    "12-run-mount-cache": "sha256:3896b4fcbfa2872917a0eca0c3ac1f550536d5a32af68bbfff6850b9547d0124",
    "13-run-mount-bind": "sha256:dc936570277d1693ca66efe7992c5c276e085c6795a36bc05dfaf3a5df14a8b4",
    "14-run-mount-secret": "sha256:2109c455a808b7e127c5276a15f212368c3e80e4b4c41b4a94af52b33d32c205",
    "15-run-mount-tmpfs": "sha256:4e42db5fcccbbc24dba36f996a4ab60feb9cd2d239ce423aa4569a43f793269f",
    "16-dockerignore": "sha256:622e456628259cc3860e228ff562706c993da6d9f7bfa10da1f62a3b37c75bc2",
    "17-add-local-tar": "sha256:d692be92244cd863b65ef8ea4b2ee93ea2ce08d35b2525363a9ae81294e840ac",
    "18-onbuild": "sha256:25cd1690fe58cf3832866754ea697da419d86f0f28d697b847bc8bb15424be22",
    "19-target": "sha256:00fe021fb6d1ced665de76047523da0acfd866d45526abffce35f6d6c58b4274",
    "20-env-forms": "sha256:5808d558a01ed8913d9aa066041f5d5738acb04bd4dc31dce91b6d90a9563f36",
    "21-copy-dest-semantics": "sha256:35264e941fc4f16789c6f27b0dd13406810636ebffa6abff49a949e786369804",
    "22-symlinks": "sha256:a3eb8cdd9f7d61ffe1138dc8b9c46a7c7e214acd8afc88f1016503d3bb106b05",
    "23-escape-directive": "sha256:953e00a2d195fefdafaecfdaf4cf4899c51b32ccf638907342b66e10901d7bb4",
    "24-scratch-final": "sha256:75569a298cb241b9fc937fe0bee406c4923dd6f7f2247dc1fc52492ac54fd6a8",
    "25-user-workdir-ownership": "sha256:b366fba4ce7604d3e19a0718ebd417e9106c442348dcd80e6be1407dcefdcce8",
    "26-run-exec-form": "sha256:550a532e5f7ca6fd6875de74db754ef5f4c84b82ca4d8abe5150cbbb4ef32729",
    "27-copy-link": "sha256:5fd12b0bc544dbded9409edcb754afbf3982da160974d2c6303a5824de63442d",
    "28-predefined-args": "sha256:ceaefae50269e2a2998205e1b7c32a451cac117c97f3ae9cbb2069c2b05f6e4b",
    "29-add-chown-multi": "sha256:63e29907fc88ee2bf9d0ed7a6fca794dc5482762b4e49a64d7c0b52a54a83155",
}


@pytest.mark.parametrize("case,text,build_args,target,excludes", corpus_cases(), ids=[c[0] for c in corpus_cases()])
def test_corpus_digests_do_not_change(case, text, build_args, target, excludes):
    d, _ = convert(text, build_args=build_args, target=target, excludes=excludes)
    assert pb.Op.FromString(getattr(d, "def")[-1]).inputs[0].digest == CORPUS_DIGESTS[case]


def test_daemon_without_a_cap_gets_the_line_and_the_cap():
    old = V08_LLB_CAPS - {"exec.mount.cache"}
    with pytest.raises(ConvertError) as e:
        convert("FROM alpine\nRUN true\nRUN --mount=type=cache,target=/c make\n", llb_caps=old)
    assert str(e.value) == ("Dockerfile:3: RUN --mount=type=cache needs the BuildKit capability 'exec.mount.cache', "
                            "which this daemon does not have (upgrade BuildKit / Docker)")
    with pytest.raises(ConvertError, match=r"Dockerfile:2: --chmod=u\+x \(not octal\) needs the BuildKit capability "
                                           r"'file.copy.modestring'"):
        convert("FROM alpine\nCOPY --chmod=u+x a /a\n")
    with pytest.raises(ConvertError, match=r"Dockerfile:2: RUN --network=none needs .*'exec.meta.network'"):
        convert("FROM alpine\nRUN --network=none true\n", llb_caps=V08_LLB_CAPS - {"exec.meta.network"})


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


# ---- what each daemon sees: the LLB emitted for v0.8's and v0.11's cap lists
CAP_SETS = {"v0.8": V08_LLB_CAPS, "v0.11": V011_LLB_CAPS}


@pytest.mark.parametrize("daemon", CAP_SETS)
@pytest.mark.parametrize("case,text,build_args,target,excludes", corpus_cases(), ids=[c[0] for c in corpus_cases()])
def test_every_op_uses_only_caps_the_daemon_offers(daemon, case, text, build_args, target, excludes):
    """A daemon refuses a Definition whose op metadata lists a cap it does not have."""
    caps = CAP_SETS[daemon]
    d, _ = convert(text, llb_caps=caps, build_args=build_args, target=target, excludes=excludes)
    for digest, md in d.metadata.items():
        used = {c for c, on in md.caps.items() if on}
        assert used <= caps, f"{case} on {daemon}: {sorted(used - caps)}"
    execs = [op.exec for _, op in ops(d) if op.WhichOneof("op") == "exec"]
    # v0.11 removes the mount points it made; v0.8 would keep them and its ops keep their digests.
    assert all(e.meta.removeMountStubsRecursive == (daemon == "v0.11") for e in execs)


def test_mount_stubs_are_removed_on_v011_only():
    text = ("FROM alpine AS tools\nRUN mkdir /t\nFROM alpine\n"
            "RUN --mount=type=bind,from=tools,source=/t,target=/mnt/t ls /mnt/t\n")
    for caps, removes in ((V08_LLB_CAPS, False), (V011_LLB_CAPS, True),
                          (V08_LLB_CAPS | {"exec.meta.removemountstubs.recursive"}, True)):
        d, _ = convert(text, llb_caps=caps)
        last = [op for _, op in ops(d) if op.WhichOneof("op") == "exec"][-1]
        assert last.exec.meta.removeMountStubsRecursive is removes
        assert "exec.meta.removemountstubs.recursive" not in {c for md in d.metadata.values() for c in md.caps}
    # The v0.8 bytes are the ones BuildKit's cache already knows.
    d08, _ = convert(text, llb_caps=V08_LLB_CAPS)
    d11, _ = convert(text, llb_caps=V011_LLB_CAPS)
    assert getattr(d08, "def")[-1] != getattr(d11, "def")[-1]


def test_copy_link_is_a_merge_on_v011_and_a_copy_on_v08():
    text = "FROM alpine\nRUN echo hi > /x\nCOPY --link a /a\n"
    d, _ = convert(text, llb_caps=V011_LLB_CAPS)
    merges = [op for _, op in ops(d) if op.WhichOneof("op") == "merge"]
    assert len(merges) == 1 and len(merges[0].merge.inputs) == 2
    copy_op = [op for _, op in ops(d) if op.WhichOneof("op") == "file"][0]
    run_digest = [dg for dg, op in ops(d) if op.WhichOneof("op") == "exec"][0]
    assert run_digest not in {i.digest for i in copy_op.inputs}  # copied onto scratch, then merged
    assert run_digest in {i.digest for i in merges[0].inputs}
    d, _ = convert(text, llb_caps=V08_LLB_CAPS)
    assert not [op for _, op in ops(d) if op.WhichOneof("op") == "merge"]


def export_step(llb_caps: set[str], build_args: dict[str, str]) -> pb.Definition:
    """The stargz export step the frontend appends (LAZYBUILD_OUTPUT=stargz), for a daemon with LLB_CAPS."""
    from lazybuild.frontend.main import Frontend, Options

    text = "FROM alpine\nRUN echo a > /a\nCOPY b /b\nRUN rm /a\n"
    args = {"LAZYBUILD_OUTPUT": "stargz", **build_args}
    build = model.load(text, build_args=args)
    caps = Caps({"solve.base"}, set(llb_caps), [])
    conv = Converter(build, caps, BuildOptions(session_id="s1"), {0: AMD64}, ShellLex("\\"))
    conv.convert()
    frontend = object.__new__(Frontend)  # no gateway: only what the export step's LLB needs
    frontend.caps, frontend.bridge, frontend.inputs = caps, None, {}
    frontend.opts = Options({"source": "127.0.0.1:5000/lazybuild:test", **{f"build-arg:{k}": v for k, v in args.items()}})
    frontend.base_digests = {"alpine": "sha256:" + "a" * 64}
    return builder.definition(frontend.stargz_export(conv, build, AMD64, AMD64))


@pytest.mark.parametrize("daemon", CAP_SETS)
def test_export_step_per_daemon(daemon):
    d = export_step(CAP_SETS[daemon], {})
    listed = ops(d)
    export = [op for _, op in listed if op.WhichOneof("op") == "exec" and "lazybuild.exporter.buildkit" in op.exec.meta.args][0]
    dests = sorted(m.dest for m in export.exec.mounts)
    diffs = [op for _, op in listed if op.WhichOneof("op") == "diff"]
    settings = json.loads([op for _, op in listed if op.WhichOneof("op") == "file"
                           and op.file.actions[0].WhichOneof("action") == "mkfile"][-1].file.actions[0].mkfile.data)
    assert settings["base"]["convert"] is True  # base layers become eStargz unless LAZYBUILD_CONVERT_BASE=0
    assert [m for m in dests if m.startswith("/lazybuild/states/")] == [f"/lazybuild/states/{i}" for i in range(4)]
    if daemon == "v0.11":
        # One DiffOp per step, each mounted where the exporter looks for it: only what changed is walked.
        assert [m for m in dests if m.startswith("/lazybuild/diffs/")] == [f"/lazybuild/diffs/{i}" for i in (1, 2, 3)]
        assert len(diffs) == 3 and settings["diffs"] == "/lazybuild/diffs"
    else:
        assert not diffs and "diffs" not in settings and not [m for m in dests if "diffs" in m]
    assert export.exec.network == pb.HOST and export.exec.security == pb.SANDBOX
    for md in d.metadata.values():
        assert {c for c, on in md.caps.items() if on} <= CAP_SETS[daemon]


def test_export_step_keeps_base_layers_with_convert_base_0():
    d = export_step(V08_LLB_CAPS, {"LAZYBUILD_CONVERT_BASE": "0"})
    settings = [json.loads(op.file.actions[0].mkfile.data) for _, op in ops(d) if op.WhichOneof("op") == "file"
                and op.file.actions[0].WhichOneof("action") == "mkfile" and op.file.actions[0].mkfile.path == "/export.json"]
    assert settings[0]["base"] == {"repository": "docker.io/library/alpine", "digest": "sha256:" + "a" * 64,
                                   "platform": "linux/amd64", "convert": False}
