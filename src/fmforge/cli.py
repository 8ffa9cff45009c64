"""The `fmforge` command: builds the parser tree from the registered subcommands and runs them.

Parsing uses jsonargparse, so every config-driven command takes `--config FILE`, dotted overrides
(`--train.lr=3e-4`) and `--print-config`. The subcommands live in `fmforge.commands.*`, one module
per area; heavy imports (torch, transformers) happen inside their handlers, never at import, so
`fmforge --help` starts in well under a second. Bad input raises `UserError`; `main` prints it on
one line and exits 2 (`--debug` shows the trace).
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from jsonargparse import ArgumentParser, Namespace

# Importing the command modules registers their subcommands.
from fmforge.commands import (  # noqa: F401
    COMMANDS,
    GROUPS,
    adapt,
    cost,
    curate,
    encoder,
    flywheel,
    generation,
    pipeline,
    posttrain,
    quantize,
    serve,
)
from fmforge.commands import new_parser as _parser
from fmforge.errors import UserError

# Top-level commands in lifecycle order for --help.
HELP_ORDER = ["quickstart", "tokenizer", "data", "pretrain", "generate", "chat", "fill", "embed",
              "search", "quantize", "export",
              "adapt", "posttrain", "eval", "experiment", "serve", "feedback", "flywheel", "cost",
              "scaling", "models", "env"]  # fmt: skip


def build_parser() -> ArgumentParser:
    """Return the full `fmforge` argument parser, built from the registered commands."""
    parser = ArgumentParser(
        prog="fmforge",
        description="fmforge: raw text to a deployed foundation model.",
        exit_on_error=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subcommands = {"": parser.add_subcommands(dest="command")}

    def rank(word: str) -> int:
        return HELP_ORDER.index(word) if word in HELP_ORDER else len(HELP_ORDER)

    # Commands are one word ("pretrain") or a group and a word ("tokenizer train"); jsonargparse
    # wants every group added before its subcommands.
    for word in sorted({path.split(" ")[0] for path in COMMANDS}, key=rank):
        if word in COMMANDS:
            sub = COMMANDS[word][0]()
            subcommands[""].add_subcommand(word, sub, help=sub.description)  # one line in --help
        else:
            group_parser = _parser(GROUPS.get(word, ""))
            subcommands[""].add_subcommand(word, group_parser, help=group_parser.description)
            subcommands[word] = group_parser.add_subcommands(dest=f"{word}_command")
    for path in (p for p in COMMANDS if " " in p):  # registration order within a group
        group, name = path.split(" ")
        sub = COMMANDS[path][0]()
        subcommands[group].add_subcommand(name, sub, help=sub.description)
    return parser


# ---------------------------------------------------------------------------------------------
# Entry point and error reporting.
# ---------------------------------------------------------------------------------------------


def _normalise_argv(argv: list[str]) -> list[str]:
    # jsonargparse spells it --print_config; accept the dashed form users type.
    return [
        "--print_config" + a[len("--print-config") :] if a.startswith("--print-config") else a
        for a in argv
    ]


def _known_keys(parser: ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest and a.dest != "help"]


def _explain_parse_error(parser: ArgumentParser, argv: list[str], message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    match = re.search(r"option '([\w.\-]+)'|unrecognized arguments: --([\w.\-]+)", first)
    if match:
        key = match.group(1) or match.group(2)
        key = key.split("=")[0]
        sub, words = parser, []
        for word in argv:
            subcommands = getattr(sub, "_subcommands_action", None)
            if subcommands is not None and word in subcommands._name_parser_map:
                sub = subcommands._name_parser_map[word]
                words.append(word)
        keys = _known_keys(sub)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        source = next(
            (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"),
            None,
        )
        flag = "--" + key.replace("_", "-")
        if source is None and "." not in key and any(a.split("=")[0] == flag for a in argv):
            hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
            command = " ".join(words)
            return f"`fmforge {command}` has no option {flag}{hint} (see fmforge {command} --help)"
        where = f"{source}: " if source else ""
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{where}unknown key {key}{hint}"
    if "Problems parsing config" in message or "could not determine a constructor" in message:
        tag = re.search(r"tag '([^']+)'", message)
        detail = f" (tag {tag.group(1)} is refused)" if tag else ""
        return f"config file is not safe YAML{detail}; use plain values"
    return " ".join(message.split())[:400]


def _command_path(ns: Namespace) -> tuple[str, Namespace]:
    words: list[str] = []
    node, key = ns, "command"
    while key in node and node[key]:
        words.append(node[key])
        node = node[node[key]]
        key = "_".join(words) + "_command"
    return " ".join(words), node


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code (2 for bad input, 130 on Ctrl-C)."""
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or os.environ.get("FMFORGE_DEBUG") == "1"
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help and --print-config exit through argparse
        return int(e.code or 0)
    except Exception as e:  # jsonargparse raises ArgumentError / NSKeyError subclasses
        if debug:
            raise
        print(f"fmforge: error: {_explain_parse_error(parser, argv, str(e))}", file=sys.stderr)
        return 2
    path, node = _command_path(ns)
    if path not in COMMANDS:
        print(
            f"fmforge: error: '{path}' needs a subcommand; see fmforge {path} --help",
            file=sys.stderr,
        )
        return 2
    try:
        code = COMMANDS[path][1](node)
    except UserError as e:
        if debug:
            raise
        print(f"fmforge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fmforge ... | head`
        sys.stderr.close()
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
