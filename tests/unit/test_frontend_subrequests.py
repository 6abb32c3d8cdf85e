"""What `buildx build --print=outline|targets` gets from our frontend (BuildKit >= v0.11 sends them as the
`requestid` option), the `frontend.caps` check, and the parser warnings sent through the gateway's Warn.
The JSON shapes are those of moby/buildkit v0.11's frontend/subrequests, which buildx decodes."""

from __future__ import annotations

import base64
import json

import pytest

from lazybuild.dockerfile import model
from lazybuild.dockerfile.parser import parse
from lazybuild.frontend import subrequests
from lazybuild.frontend.main import answer

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE=alpine
ARG TAG=3.18
# VERSION the version to build
ARG VERSION=1.0
ARG UNUSED=x
# builder compiles the program
FROM ${BASE}:${TAG} AS builder
ARG VERSION
# GOFLAGS flags for the compiler
ARG GOFLAGS=-trimpath
RUN --mount=type=secret,id=token,required=true --mount=type=ssh make VERSION=$VERSION

FROM --platform=linux/amd64 debian AS other
ARG ONLY_HERE=1

FROM scratch
COPY --from=builder /out /app
"""


def lines(entry: dict) -> tuple[int, int]:
    r = entry["location"]["ranges"][0]
    return r["start"]["line"], r["end"]["line"]


def test_targets_lists_every_stage_last_one_default():
    a = subrequests.targets(DOCKERFILE, "Dockerfile")
    got = [(t.get("name", ""), t.get("default", False), t.get("description", ""), t["base"], t.get("platform", ""),
            lines(t)) for t in a.data["targets"]]
    assert got == [("builder", False, "compiles the program", "${BASE}:${TAG}", "", (8, 8)),
                   ("other", False, "", "debian", "linux/amd64", (14, 14)),
                   ("", True, "", "scratch", "", (17, 17))]
    assert base64.b64decode(a.data["sources"][0]).decode() == DOCKERFILE
    assert a.text.splitlines()[0].split() == ["TARGET", "DESCRIPTION"]
    assert "(default)" in a.text and "builder   compiles the program" in a.text


def test_outline_has_the_args_secrets_and_ssh_the_target_uses():
    build = model.load(DOCKERFILE, build_args={"VERSION": "2.0"})
    a = subrequests.outline(DOCKERFILE, "Dockerfile", build)
    args = [(x["name"], x.get("value", ""), x.get("description", ""), lines(x)) for x in a.data["args"]]
    # BASE and TAG are used by builder's FROM; VERSION is declared in builder (described by the global
    # ARG it inherits); GOFLAGS is builder's own; UNUSED and the other stage's ONLY_HERE are not needed.
    assert args == [("BASE", "alpine", "", (2, 2)), ("TAG", "3.18", "", (3, 3)),
                    ("VERSION", "2.0", "the version to build", (5, 5)),
                    ("GOFLAGS", "-trimpath", "flags for the compiler", (11, 11))]
    assert [(s["name"], s.get("required", False), lines(s)) for s in a.data["secrets"]] == [("token", True, (12, 12))]
    assert [(s["name"], s.get("required", False)) for s in a.data["ssh"]] == [("default", False)]
    assert "name" not in a.data  # the default target is the unnamed last stage
    assert a.text.splitlines()[0].split() == ["BUILD", "ARG", "VALUE", "DESCRIPTION"]


def test_outline_of_a_named_target_and_a_global_arg_named_by_another():
    text = "ARG A=1\nARG B=${A}-x\n# app the application\nFROM alpine:${B} AS app\nRUN true\n"
    build = model.load(text, target="app")
    a = subrequests.outline(text, "Dockerfile", build)
    assert a.data["name"] == "app" and a.data["description"] == "the application"
    assert [(x["name"], x.get("value")) for x in a.data["args"]] == [("A", "1"), ("B", "1-x")]
    assert a.text.startswith("TARGET:      app\nDESCRIPTION: the application\n")


def test_describe_and_result_metadata():
    a = subrequests.describe()
    assert [d["name"] for d in a.data] == ["frontend.outline", "frontend.targets", "frontend.subrequests.describe"]
    assert all(d["version"] == "1.0.0" and d["type"] == "rpc" for d in a.data)
    res = answer(a)
    assert set(res.metadata) == {"result.json", "result.txt", "version"} and res.WhichOneof("result") is None
    assert json.loads(res.metadata["result.json"]) == a.data
    assert res.metadata["result.txt"].decode().startswith("NAME")


def test_unknown_requests_and_frontend_caps_are_refused():
    with pytest.raises(subrequests.UnsupportedRequest, match="unsupported request frontend.lint"):
        subrequests.needs_dockerfile("frontend.lint")
    subrequests.check_frontend_caps("moby.buildkit.frontend.subrequests,moby.buildkit.frontend.contexts+forward")
    with pytest.raises(subrequests.UnsupportedRequest, match="unsupported frontend capability moby.buildkit.frontend.x"):
        subrequests.check_frontend_caps("moby.buildkit.frontend.x+forward")


def test_parser_warnings_carry_what_warn_sends():
    w, = parse("FROM alpine\nRUN echo a \\\n\n    b\n", "Dockerfile.dev").warnings
    assert (w.short, w.line, w.url) == ("Empty continuation line found in: RUN echo a     b", 4,
                                        "https://github.com/moby/moby/pull/33719")
    assert "future release" in w.detail
    assert str(w) == "Dockerfile.dev:4: empty continuation line found in: RUN echo a     b"
