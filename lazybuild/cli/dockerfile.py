"""`lazybuild inspect-dockerfile`: how the Dockerfile front end reads a Dockerfile, as JSON."""

from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    d = sub.add_parser("inspect-dockerfile", help="print the resolved stages, instructions and image config of a Dockerfile as JSON")
    d.add_argument("context", metavar="CONTEXT", nargs="?", default=".")
    d.add_argument("-f", "--file", metavar="Dockerfile", help="default: CONTEXT/Dockerfile")
    d.add_argument("--target", metavar="T", help="the stage to build (default: the last)")
    d.add_argument("--build-arg", metavar="K=V", action="append", default=[])
    d.add_argument("--platform", metavar="P", help="target platform (default linux/amd64)")
    d.set_defaults(func=inspect_dockerfile)


def inspect_dockerfile(args) -> int:
    from .. import inroot
    from ..dockerfile.dockerignore import DockerIgnore
    from ..dockerfile.model import load

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
    platform = args.platform or "linux/amd64"
    build = load(text, filename=dockerfile, build_args=build_args, target=args.target or "", platform=platform)
    out = build.to_json()
    out["dockerignore"] = DockerIgnore.for_dockerfile(context, dockerfile).to_json()
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0
