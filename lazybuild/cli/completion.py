"""`lazybuild completion bash|zsh`: a shell completion script, written from the argument parsers themselves
(so it completes exactly the commands, options and choices `lazybuild` takes today).

The script holds four small tables as shell functions, keyed by command path ("" the top, "layer convert"):
the commands under a path, its options, the options that take a value, and the choices of an option.
`_lazybuild` walks the words typed so far to find the path, then completes a choice after an option that
takes one, an option after `-`, or a command; anything else falls back to file names (`complete -o default`).
zsh runs the same functions through its bash compatibility (`bashcompinit`).
"""

from __future__ import annotations

import argparse
import sys

from .options import subcommands, walk_commands

SHELLS = ("bash", "zsh")


def add_parser(sub) -> None:
    c = sub.add_parser("completion", help="print a shell completion script: "
                                          "`source <(lazybuild completion bash)` (or zsh)")
    c.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    c.set_defaults(func=completion)


def completion(args) -> int:
    from . import build_parser

    sys.stdout.write(script(build_parser(), args.shell))
    return 0


def _quote(words) -> str:
    """WORDS as one double-quoted shell word (option names, command names and choices: no quotes in them)."""
    return '"' + " ".join(words) + '"'


def _case(name: str, key: str, rows: dict[str, list[str]]) -> list[str]:
    """A shell function NAME that echoes the row of KEY (a shell expression)."""
    lines = [f"{name}() {{", f"    case {key} in"]
    lines += [f"        {_quote([k])}) echo {_quote(v)} ;;" for k, v in rows.items() if v]
    lines += ["    esac", "}"]
    return lines


def _tables(parser: argparse.ArgumentParser) -> list[str]:
    commands, options, valued, choices = {}, {}, {}, {}
    for path, p in walk_commands(parser):
        commands[path] = list(subcommands(p))
        opts, takes = [], []
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            opts += action.option_strings
            if action.nargs != 0:  # store_true/version/help take no value
                takes += action.option_strings
                if action.choices:
                    for option in action.option_strings:
                        choices[f"{path}|{option}"] = [str(c) for c in action.choices]
        options[path], valued[path] = opts, takes
    return (_case("_lazybuild_commands", '"$1"', commands) + _case("_lazybuild_options", '"$1"', options)
            + _case("_lazybuild_valued", '"$1"', valued) + _case("_lazybuild_choices", '"$1|$2"', choices))


_MAIN = r'''
_lazybuild() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path="" word i=1
    [ "$COMP_CWORD" -gt 0 ] && prev="${COMP_WORDS[COMP_CWORD-1]}"
    while [ "$i" -lt "$COMP_CWORD" ]; do  # the command path typed so far, skipping options and their values
        word="${COMP_WORDS[i]}"
        if [[ "$word" == -* ]]; then
            [[ " $(_lazybuild_valued "$path") " == *" $word "* ]] && i=$((i+1))
        elif [[ " $(_lazybuild_commands "$path") " == *" $word "* ]]; then
            path="${path:+$path }$word"
        fi
        i=$((i+1))
    done
    COMPREPLY=()
    if [[ "$prev" == -* && " $(_lazybuild_valued "$path") " == *" $prev "* ]]; then
        local choices
        choices="$(_lazybuild_choices "$path" "$prev")"
        [ -n "$choices" ] && COMPREPLY=($(compgen -W "$choices" -- "$cur"))
        return 0  # a value without choices: file names
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_lazybuild_options "$path")" -- "$cur"))
    else
        local commands
        commands="$(_lazybuild_commands "$path")"
        [ -n "$commands" ] && COMPREPLY=($(compgen -W "$commands" -- "$cur"))
    fi
    return 0
}
complete -o default -F _lazybuild lazybuild
'''


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for SHELL (bash or zsh) of PARSER's commands."""
    head = [f"# {shell} completion for lazybuild, written by `lazybuild completion {shell}`.",
            f"# Load it with: source <(lazybuild completion {shell})"]
    if shell == "zsh":  # the bash functions below, through zsh's bash compatibility
        head += ["autoload -U +X compinit && { (( $+functions[compdef] )) || compinit; }",
                 "autoload -U +X bashcompinit && bashcompinit"]
    return "\n".join(head + _tables(parser)) + "\n" + _MAIN
