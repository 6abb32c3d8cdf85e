"""`lazybuild inspect-dockerfile`: how the Dockerfile front end reads a Dockerfile (stages, instructions,
image config): a summary for people, everything with --format json."""

from __future__ import annotations

import os

from . import output


def add_parser(sub) -> None:
    d = sub.add_parser("inspect-dockerfile", help="print the resolved stages, instructions and image config of a "
                                                  "Dockerfile (all of it with --format json)")
    d.add_argument("context", metavar="CONTEXT", nargs="?", default=".")
    d.add_argument("-f", "--file", metavar="Dockerfile", help="default: CONTEXT/Dockerfile")
    d.add_argument("--target", metavar="T", help="the stage to build (default: the last)")
    d.add_argument("--build-arg", metavar="K=V", action="append", default=[])
    d.add_argument("--platform", metavar="P", help="target platform (default: this machine's, as `lazybuild build`)")
    d.set_defaults(func=inspect_dockerfile)


def inspect_dockerfile(args) -> int:
    from .. import inroot
    from ..dockerfile.dockerignore import DockerIgnore
    from ..dockerfile.model import load
    from ..image import Platform

    context = args.context
    dockerfile = args.file or os.path.join(context, "Dockerfile")
    if args.file:  # the user's own path
        with open(dockerfile, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    else:  # a name in the context, which may link anywhere: read inside it
        data = inroot.read_file(context, "Dockerfile", 16 << 20)
        if data is None:
            raise FileNotFoundError(2, "No such file or directory", dockerfile)
        text = data.decode("utf-8", errors="surrogateescape")
    build_args = {}
    for kv in args.build_arg:
        key, has_value, value = kv.partition("=")
        if has_value:
            build_args[key] = value
        elif key in os.environ:  # `--build-arg NAME` takes the value from the environment, as docker does
            build_args[key] = os.environ[key]
    host = str(Platform.host())  # as the builder reads it: targets and builds on this machine by default
    platform = args.platform or host
    build = load(text, filename=dockerfile, build_args=build_args, target=args.target or "", platform=platform,
                 build_platform=host)
    out = build.to_json()
    out["dockerignore"] = DockerIgnore.for_dockerfile(context, dockerfile).to_json()
    output.emit(args, output.Result(out, _text(out, platform)))
    return 0


def _text(doc: dict, platform: str) -> str:
    """The stages the target needs, one line per instruction, and the warnings."""
    lines = [f"target {doc['target']} for {platform}"]
    for stage in doc["stages"]:
        name = f" AS {stage['name']}" if stage["name"] else ""
        lines.append(f"stage {stage['index']}: FROM {stage['base']}{name}  (line {stage['line']})")
        lines += [f"  {ins['line']:>4}  {ins['text']}" for ins in stage["instructions"]]
    lines += [f"warning: {w}" for w in doc["warnings"]]
    return "\n".join(lines)
