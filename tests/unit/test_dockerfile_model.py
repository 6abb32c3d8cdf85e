"""The Dockerfile model: ARG scoping, expansion where BuildKit expands, image config and history, stages
and targets, flag validation, .dockerignore, and `lazybuild inspect-dockerfile` (the model's to_json).
How instructions become steps is tested in test_dockerfile_steps.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lazybuild.dockerfile.dockerignore import DockerIgnore, read_patterns
from lazybuild.dockerfile.instructions import ArgDecl, Copy, Heredoc, KeyValue, Run
from lazybuild.dockerfile.model import DockerfileError, load
from lazybuild.dockerfile.steps import CacheMount, CopySource, CopyStep, RunStep

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE=debian
ARG TAG=bookworm
FROM ${BASE}:${TAG} AS build
ARG TAG
ARG TARGETARCH
ARG NOTSET
ENV DIR=/src OPT=${NOTSET:-dflt}
WORKDIR ${DIR}/sub
RUN --mount=type=cache,target=/root/.cache,id=c-${TAG} --network=none echo $DIR ${TAG} > out
COPY --chown=${TAG}:0 a${TAG} ${DIR}/
LABEL l1="v ${TAG}"
FROM scratch AS unused
COPY x y
FROM build AS final
COPY --from=build /src/out /out
EXPOSE 80 ${PORT:-53}/udp 8000-8001
ENTRYPOINT ["/bin/app"]
"""


def stage(build, name):
    return next(s for s in build.stages if s.name == name)


def test_args_and_expansion():
    b = load(DOCKERFILE, build_args={"TAG": "trixie"}, platform="linux/arm64")
    assert b.syntax == "docker/dockerfile:1"
    build = stage(b, "build")
    assert build.base == "debian:trixie"  # global ARGs in FROM, with the build-arg override
    ins = [r.instruction for r in build.instructions]
    assert ins[0].args == (ArgDecl("TAG", "trixie"),)  # a redeclared global brings its value
    assert ins[1].args == (ArgDecl("TARGETARCH", "arm64"),)
    assert ins[2].args == (ArgDecl("NOTSET", None),)
    assert ins[3].pairs == (KeyValue("DIR", "/src"), KeyValue("OPT", "dflt"))
    assert ins[4].path == "/src/sub"
    run = build.instructions[5].step
    assert isinstance(run, RunStep) and isinstance(ins[5], Run)
    assert run.argv == ("/bin/sh", "-c", "echo $DIR ${TAG} > out")  # RUN text is the shell's to expand
    assert run.mounts == (CacheMount("/root/.cache", "c-trixie", "shared", False, None, "", "/", 0, 0, 0o755,
                                     owned=False),)
    assert run.network == "none" and run.cwd == "/src/sub"
    copy = build.instructions[6].step
    assert isinstance(copy, CopyStep) and copy.chown == "trixie:0" and copy.dest == "/src/"
    assert copy.sources == (CopySource("atrixie", "path"),)
    # inspect-dockerfile's JSON: the mount as written, with the parser's defaults
    run_json = b.to_json()["stages"][0]["instructions"][5]
    assert run_json["mounts"][0] == {"type": "cache", "target": "/root/.cache", "id": "c-trixie", "sharing": "shared",
                                     "readonly": False}
    assert run_json["network"] == "none" and run_json["workdir"] == "/src/sub"
    assert build.config["Labels"] == {"l1": "v trixie"}
    assert "DIR=/src" in build.config["Env"] and build.config["WorkingDir"] == "/src/sub"


def test_stages_targets_and_config():
    b = load(DOCKERFILE)
    assert [s.name for s in b.stages] == ["build", "final"]  # `unused` is pruned
    final = b.target
    assert final.base_stage == 0 and final.steps[0].from_stage == 0 and final.steps[0].from_image == ""
    assert final.to_json()["instructions"][0]["fromStage"] == 0
    assert final.config["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}}  # ranges expand
    assert final.config["Entrypoint"] == ["/bin/app"] and "Cmd" not in final.config
    assert final.config["Labels"] == {"l1": "v bookworm"}  # inherited from the base stage
    created = [h["created_by"] for h in final.history]
    assert created[-1] == 'ENTRYPOINT ["/bin/app"]' and final.history[-1]["empty_layer"]
    assert "RUN |2 TAG=bookworm TARGETARCH=amd64 /bin/sh -c echo $DIR ${TAG} > out # buildkit" in created
    b2 = load(DOCKERFILE, target="UNUSED")
    assert [s.name for s in b2.stages] == ["unused"] and b2.target.config["Env"][0].startswith("PATH=")
    with pytest.raises(DockerfileError, match="target stage 'nope' could not be found"):
        load(DOCKERFILE, target="nope")


def test_cmd_entrypoint_shell_and_onbuild():
    b = load('FROM scratch AS base\nCMD ["a"]\nSHELL ["/bin/bash", "-ec"]\nONBUILD ENV FROM_TRIGGER=1\n'
             'FROM base\nENTRYPOINT run me\nCMD more\n')
    t = b.target
    assert t.config["Entrypoint"] == ["/bin/bash", "-ec", "run me"] and t.config["Cmd"] == ["/bin/bash", "-ec", "more"]
    assert "FROM_TRIGGER=1" in t.config["Env"] and "OnBuild" not in t.config
    assert stage(b, "base").config["OnBuild"] == ["ENV FROM_TRIGGER=1"]


@pytest.mark.parametrize("text,message,line", [
    ("FROM x\nCOPY --nope=1 a b\n", "unknown flag: nope", 2),
    ("FROM x\nRUN --mount=type=disk,target=/x true\n", "unsupported mount type", 2),
    ("FROM x\nRUN --mount=type=cache true\n", "requires a target", 2),
    ("FROM x\nRUN --network=bridge true\n", "unsupported network mode", 2),
    ("FROM x\n\nHEALTHCHECK --interval=abc CMD true\n", "invalid duration", 3),
    ("FROM x\nHEALTHCHECK --retries=-1 CMD true\n", "cannot be negative", 2),
    ("FROM x\nONBUILD FROM y\n", "isn't allowed as an ONBUILD trigger", 2),
    ("FROM x\nCOPY onlyone\n", "requires at least two arguments", 2),
    ("FROM x y\n", "FROM requires either one or three arguments", 1),
    ("FROM x AS 1bad\n", "invalid name for build stage", 1),
    ("RUN true\n", "first instruction must be FROM", 1),
    ("FROM x\nBOGUS a\n", "unknown instruction: BOGUS", 2),
    ("FROM x\nSHELL /bin/sh\n", "JSON form", 2),
    ("FROM x\nCOPY --from=$S a b\n", "does not support variables", 2),
    ("FROM x\nWORKDIR ${X:?must be set}\n", "must be set", 2),
])
def test_errors_name_the_line(text, message, line):
    with pytest.raises(DockerfileError, match=message) as e:
        load(text, filename="ctx/Dockerfile")
    assert str(e.value).startswith(f"ctx/Dockerfile:{line}: ")


def test_proxy_args_go_to_run_only():
    b = load("FROM x\nRUN true\n", build_args={"HTTP_PROXY": "http://127.0.0.1:3128", "OTHER": "x"})
    run = b.target.steps[0]
    assert run.proxy_env == (KeyValue("HTTP_PROXY", "http://127.0.0.1:3128"),)
    assert not any("PROXY" in e for e in run.env) and "PROXY" not in json.dumps(b.target.history)
    assert b.to_json()["stages"][0]["instructions"][0]["proxyEnv"] == {"HTTP_PROXY": "http://127.0.0.1:3128"}


def test_heredoc_files_reach_the_model():
    b = load("FROM x\nRUN <<EOF\necho hi\nEOF\nCOPY <<conf /etc/app.conf\nk=v\nconf\n")
    run, copy = (r.instruction for r in b.target.instructions)
    assert isinstance(run, Run) and run.heredocs == (Heredoc("EOF", "echo hi\n", chomp=False, expand=True),)
    assert isinstance(copy, Copy) and copy.heredocs[0].name == "conf" and copy.sources == ()
    assert b.target.steps[1].dest == "/etc/app.conf"
    run_json, copy_json = b.to_json()["stages"][0]["instructions"]
    assert run_json["files"] == [{"name": "EOF", "data": "echo hi\n", "chomp": False, "expand": True}]
    assert copy_json["files"] == [{"name": "conf", "data": "k=v\n"}] and copy_json["sources"] == []


def test_dockerignore(tmp_path):
    patterns = read_patterns("# comment\n\n/node_modules\n**/*.pyc\n*.md\n!README.md\nbuild/**\n  tmp?/  \n")
    assert patterns == ["node_modules", "**/*.pyc", "*.md", "!README.md", "build/**", "tmp?"]
    ig = DockerIgnore(patterns)
    assert ig.ignored("node_modules/x/y.js") and ig.ignored("a/b/c.pyc") and ig.ignored("c.pyc")
    assert ig.ignored("NOTES.md") and not ig.ignored("README.md") and not ig.ignored("docs/NOTES.md")
    assert ig.ignored("build/out/bin") and ig.ignored("tmp1/file") and not ig.ignored("src/main.py")
    (tmp_path / ".dockerignore").write_text("*.log\n")
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    assert DockerIgnore.for_dockerfile(str(tmp_path), str(tmp_path / "Dockerfile")).to_json() == ["*.log"]
    (tmp_path / "Dockerfile.dockerignore").write_text("secret\n")
    assert DockerIgnore.for_dockerfile(str(tmp_path), str(tmp_path / "Dockerfile")).to_json() == ["secret"]


def test_inspect_dockerfile_cli(tmp_path):
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / ".dockerignore").write_text(".git\n")
    lb = shutil.which("lazybuild")
    p = subprocess.run([lb, "inspect-dockerfile", str(tmp_path), "--build-arg", "TAG=sid", "--target", "build",
                        "--platform", "linux/arm64", "--format", "json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["target"] == "build" and out["stages"][0]["base"] == "debian:sid" and out["dockerignore"] == [".git"]
    assert out["config"]["WorkingDir"] == "/src/sub"
    (tmp_path / "Dockerfile").write_text("FROM x\nRUN --network=bogus true\n")
    p = subprocess.run([lb, "inspect-dockerfile", "-f", str(tmp_path / "Dockerfile"), str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and f"{tmp_path}/Dockerfile:2: unsupported network mode" in p.stderr
