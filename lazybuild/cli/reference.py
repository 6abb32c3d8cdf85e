"""README's command reference, written from the argument parsers: `python3 -m lazybuild.cli.reference`
rewrites the part of README.md between the two markers below; `--check` only says whether it is current
(tests/unit/test_cli_conventions.py runs it, so the reference cannot drift from the parsers).

Defaults that come from the environment ($LAZYBUILD_STATE, $LAZYBUILD_CACHE, $CONTAINERD_NAMESPACE) are
written as they are without it: the script runs itself again without those variables.
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import GLOBAL_DEFAULTS, subcommands, walk_commands

BEGIN = "<!-- BEGIN command reference: written by `python3 -m lazybuild.cli.reference`; do not edit -->"
END = "<!-- END command reference -->"
ENVIRONMENT_DEFAULTS = ("LAZYBUILD_STATE", "LAZYBUILD_CACHE", "CONTAINERD_NAMESPACE")
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _metavar(action: argparse.Action) -> str:
    if isinstance(action, argparse._SubParsersAction):
        return action.metavar or "COMMAND"
    if action.metavar:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices and not action.option_strings:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _positional(action: argparse.Action) -> str:
    name = _metavar(action)
    match action.nargs:
        case "?":
            return f"[{name}]"
        case "*":
            return f"[{name} ...]"
        case "+":
            return f"{name} [{name} ...]"
        case argparse.REMAINDER:
            return "..."
        case _:
            return name


def _option(action: argparse.Action) -> str:
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices and not action.metavar:
        return f"{names} {{{','.join(map(str, action.choices))}}}"
    return f"{names} {_metavar(action)}"


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    text = argparse.HelpFormatter(prog)._expand_help(action)  # %(default)s and friends, as --help shows them
    return " ".join(text.split())


def _is_global(action: argparse.Action) -> bool:
    return action.dest in GLOBAL_DEFAULTS or action.dest == "help"


def render(parser: argparse.ArgumentParser) -> str:
    """The reference in Markdown: the global options once, then every command: what it does, its usage,
    its arguments and options."""
    out = ["Every command also takes `-h/--help` and the global options, before or after its name:", ""]
    for action in parser._actions:
        if action.option_strings and action.dest in GLOBAL_DEFAULTS:
            out.append(f"- `{_option(action)}`: {_help(action, parser.prog)}")
    shown = set()
    for _, p in walk_commands(parser):  # --progress and -q: on the commands that show progress, have a digest
        for action in p._actions:
            if action.dest in ("progress", "quiet") and action.dest not in shown:
                shown.add(action.dest)
                out.append(f"- `{_option(action)}`: {_help(action, p.prog)} (where the command has it)")
    out.append("")
    helps = {}
    for path, p in walk_commands(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    helps[f"{path} {choice.dest}".strip()] = choice.help or ""
    for path, p in walk_commands(parser):
        if not path:
            continue
        positionals = [a for a in p._actions if not a.option_strings]
        options = [a for a in p._actions if a.option_strings and not _is_global(a)]
        extra = [a for a in p._actions if a.option_strings and a.dest in ("progress", "quiet")]
        out += [f"### `lazybuild {path}`", ""]
        if helps.get(path):
            out += [helps[path][0].upper() + helps[path][1:] + ".", ""]
        usage = " ".join(["lazybuild", path] + (["[OPTIONS]"] if options or extra else [])
                         + [_positional(a) for a in positionals])
        out += ["```", usage, "```", ""]
        for a in positionals:
            if isinstance(a, argparse._SubParsersAction):
                out.append(f"- `{_metavar(a)}`: one of {', '.join(f'`{name}`' for name in subcommands(p))}")
            else:
                out.append(f"- `{_metavar(a)}`" + (f": {_help(a, p.prog)}" if a.help else ""))
        for a in options:
            out.append(f"- `{_option(a)}`" + (f": {_help(a, p.prog)}" if a.help else ""))
        if extra:
            out.append("- also " + " and ".join(f"`{_option(a)}`" for a in extra) + " (global options above)")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def replace_section(readme: str, reference: str) -> str:
    """README text with the part between the markers replaced by REFERENCE."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"lazybuild: error: README.md lacks the markers {BEGIN!r} ... {END!r}")
    return readme[:start + len(BEGIN)] + "\n" + reference + readme[end:]


def main(argv: list[str]) -> int:
    if any(name in os.environ for name in ENVIRONMENT_DEFAULTS):  # the defaults as they are without them
        env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_DEFAULTS}
        os.execve(sys.executable, [sys.executable, "-m", "lazybuild.cli.reference", *argv], env)
    from . import build_parser

    path = os.path.abspath(README)
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    updated = replace_section(readme, render(build_parser()))
    if "--check" in argv:
        if updated != readme:
            print("lazybuild: error: README.md's command reference differs from the parsers", file=sys.stderr)
            print("lazybuild: hint: run `python3 -m lazybuild.cli.reference` and commit README.md", file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        tmp = path + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(updated)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
