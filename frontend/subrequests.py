"""Sub-requests: what `buildx build --print=outline|targets` (and `--call` in newer buildx) ask a frontend
instead of a build. Each answer is a Result with no refs and three metadata keys, as BuildKit's Dockerfile
frontend gives them (frontend/subrequests in moby/buildkit v0.11): `result.json` (the data), `result.txt`
(the same for a terminal) and `version`.

The data comes from the same typed model the build uses: the stages the target needs, their ARGs (with
the value in effect and the `# NAME description` comment above them), secrets and ssh ids of RUN mounts,
each with the Dockerfile lines it comes from.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from lazybuild.dockerfile import model
from lazybuild.errors import UsageError
from lazybuild.dockerfile.instructions import Arg, From, Instruction, instructions
from lazybuild.dockerfile.parser import parse
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.dockerfile.steps import RunStep, SecretMount, SshMount

OUTLINE, TARGETS, DESCRIBE = "frontend.outline", "frontend.targets", "frontend.subrequests.describe"
VERSION = "1.0.0"  # of each request's answer format; all three are 1.0.0 upstream
RESULT_METADATA = [{"name": "result.json", "description": ""}, {"name": "result.txt", "description": ""}]
DEFINITIONS = [
    {"name": OUTLINE, "version": VERSION, "type": "rpc",
     "description": "List all parameters current build target supports",
     "opts": [{"name": "target", "description": "Target build stage"}], "inputs": None,
     "metadata": RESULT_METADATA, "refs": None},
    {"name": TARGETS, "version": VERSION, "type": "rpc", "description": "List all targets current build supports",
     "opts": [], "inputs": None, "metadata": RESULT_METADATA, "refs": None},
    {"name": DESCRIBE, "version": VERSION, "type": "rpc", "description": "List available subrequest types",
     "opts": None, "inputs": None, "metadata": RESULT_METADATA, "refs": None},
]
# The frontend capabilities a client may ask for in the `frontend.caps` option (BuildKit's Dockerfile
# frontend has the same three).
FRONTEND_CAPS = ("moby.buildkit.frontend.inputs", "moby.buildkit.frontend.subrequests", "moby.buildkit.frontend.contexts")


class UnsupportedRequest(UsageError):
    """A sub-request or frontend capability this frontend does not have."""


@dataclass(frozen=True)
class Answer:
    """A sub-request's answer: what goes into the Result's metadata."""

    data: object  # result.json
    text: str  # result.txt

    def metadata(self) -> dict[str, bytes]:
        return {"result.json": json.dumps(self.data, indent=2).encode(), "result.txt": self.text.encode(),
                "version": VERSION.encode()}


def check_frontend_caps(requested: str) -> None:
    """`frontend.caps=a,b+forward`: refuse a capability this frontend does not have."""
    for cap in filter(None, (c.strip() for c in requested.split(","))):
        name = cap.split("+", 1)[0]
        if name not in FRONTEND_CAPS:
            raise UnsupportedRequest(f"unsupported frontend capability {name}")


def needs_dockerfile(request: str) -> bool:
    if request not in (OUTLINE, TARGETS, DESCRIBE):
        raise UnsupportedRequest(f"unsupported request {request}")
    return request != DESCRIBE


def describe() -> Answer:
    rows = [(d["name"].removeprefix("frontend."), d["version"], d["description"]) for d in DEFINITIONS]
    return Answer(DEFINITIONS, _table(["NAME", "VERSION", "DESCRIPTION"], rows, gap=1))


def _location(ins: Instruction) -> dict:
    """BuildKit's pb.Location as Go's encoding/json writes it (zero fields left out)."""
    return {"ranges": [{"start": {"line": ins.line}, "end": {"line": ins.end_line}}]}


def _description(ins: Instruction, name: str) -> str:
    """The `# NAME text` comment right above an instruction: BuildKit's description of NAME."""
    if not name:
        return ""
    return next((c[len(name) + 1:] for c in ins.comments if c.startswith(name + " ")), "")


def _without_empty(d: dict) -> dict:
    """Go's `omitempty`: empty strings, false and empty lists are left out."""
    return {k: v for k, v in d.items() if v not in ("", False, None, [])}


def targets(text: str, filename: str) -> Answer:
    """Every stage of the Dockerfile, the last one the default."""
    froms = [i for i in instructions(parse(text, filename), filename) if isinstance(i, From)]
    listed = [_without_empty({"name": f.name, "default": n == len(froms) - 1, "description": _description(f, f.name),
                              "base": f.image, "platform": f.platform, "location": _location(f)})
              for n, f in enumerate(froms)]
    rows = []
    for t in listed:
        name = t.get("name", "")
        if t.get("default"):
            name = f"{name} (default)" if name else "(default)"
        rows.append((name, t.get("description", "")))
    return Answer({"targets": listed, "sources": [_source(text)]}, _table(["TARGET", "DESCRIPTION"], rows, gap=1))


def outline(text: str, filename: str, build: model.Build) -> Answer:
    """The build args, secrets and ssh ids the target (and the stages it needs) uses."""
    parsed = instructions(parse(text, filename), filename)
    meta = _meta_args(parsed, build)
    used: set[str] = set()
    stage_args: dict[str, dict] = {}  # ARGs declared in a stage (not inherited from the global scope)
    secrets: dict[str, dict] = {}
    ssh: dict[str, dict] = {}
    froms = [i for i in parsed if isinstance(i, From)]
    lex = ShellLex(build.escape_token)
    for stage in build.stages:
        header = froms[stage.index]
        for word in (header.image, header.platform):
            used |= _references(lex, word, meta)
        for resolved in stage.instructions:
            ins = resolved.instruction
            if isinstance(ins, Arg):
                original = next((i for i in parsed if i.line == ins.line and isinstance(i, Arg)), ins)
                for decl, written in zip(ins.args, original.args):
                    used.add(decl.key)
                    if written.value is None and decl.key in meta:
                        continue  # the global ARG's own entry describes it
                    stage_args.setdefault(decl.key, _without_empty({
                        "name": decl.key, "description": _description(original, decl.key) if len(original.args) == 1 else "",
                        "value": decl.value or "", "location": _location(ins)}))
            step = resolved.step
            if isinstance(step, RunStep):
                for m in step.mounts:
                    if isinstance(m, SecretMount):
                        secrets.setdefault(m.id, _without_empty({"name": m.id, "required": m.required,
                                                                 "location": _location(ins)}))
                    elif isinstance(m, SshMount):
                        ssh.setdefault(m.id, _without_empty({"name": m.id, "required": m.required,
                                                             "location": _location(ins)}))
    # A global ARG whose default names another makes that one used too.
    pending = list(used)
    while pending:
        key = pending.pop()
        for dep in meta.get(key, {}).get("deps", ()):
            if dep not in used:
                used.add(dep)
                pending.append(dep)
    args = [stage_args.get(k) or meta[k]["entry"] for k in used if k in stage_args or k in meta]
    by_line = lambda e: e.get("location", {}).get("ranges", [{}])[0].get("start", {}).get("line", 0)
    target = froms[build.target.index]
    data = _without_empty({"name": build.target.name, "description": _description(target, build.target.name),
                           "args": sorted(args, key=by_line), "secrets": sorted(secrets.values(), key=by_line),
                           "ssh": sorted(ssh.values(), key=by_line), "sources": [_source(text)]})
    return Answer(data, _outline_text(data))


def _meta_args(parsed: list[Instruction], build: model.Build) -> dict[str, dict]:
    """The ARGs before the first FROM: their entry (value in effect) and the global ARGs their default names."""
    lex = ShellLex(build.escape_token)
    out: dict[str, dict] = {}
    for ins in parsed:
        if isinstance(ins, From):
            break
        if not isinstance(ins, Arg):
            continue
        for decl in ins.args:
            deps = _references(lex, decl.value or "", {k: v for k, v in out.items()})
            entry = _without_empty({"name": decl.key,
                                    "description": _description(ins, decl.key) if len(ins.args) == 1 else "",
                                    "value": build.meta_args.get(decl.key, ""), "location": _location(ins)})
            out[decl.key] = {"entry": entry, "deps": deps}
    return out


def _references(lex: ShellLex, word: str, known: dict) -> set[str]:
    """The names of KNOWN that WORD expands."""
    if not word or "$" not in word:
        return set()
    try:
        return lex.process_word_with_matches(word, {k: "" for k in known}).matched & set(known)
    except ValueError:  # the build itself reports a word it cannot expand
        return set()


def _source(text: str) -> str:
    """A Go []byte in JSON: base64."""
    return base64.b64encode(text.encode()).decode()


def _table(header: list[str], rows: list[tuple[str, ...]], gap: int) -> str:
    """Columns padded as Go's tabwriter pads them (the last column is not padded)."""
    all_rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) + gap for i in range(len(header) - 1)]
    return "".join("".join(c.ljust(w) for c, w in zip(r, widths)) + r[-1] + "\n" for r in all_rows)


def _outline_text(data: dict) -> str:
    out = ""
    if data.get("name") or data.get("description"):
        out += _table(["TARGET:", data.get("name") or "(default)"], [("DESCRIPTION:", data["description"])]
                      if data.get("description") else [], gap=1) + "\n"
    if data.get("args"):
        out += _table(["BUILD ARG", "VALUE", "DESCRIPTION"],
                      [(a["name"], a.get("value", ""), a.get("description", "")) for a in data["args"]], gap=3) + "\n"
    for key, title in (("secrets", "SECRET"), ("ssh", "SSH")):
        if data.get(key):
            out += _table([title, "REQUIRED"], [(s["name"], "true" if s.get("required") else "")
                                                for s in data[key]], gap=3) + "\n"
    return out
