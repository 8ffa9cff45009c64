"""The `fmforge` subcommands, registered by path ("pretrain", "tokenizer train").

Each module here holds one area's parsers and thin handlers; a handler parses, then calls one
function of a stage module, importing it lazily so `fmforge --help` never imports torch.
`fmforge.cli` builds the parser tree from the registry and runs `main`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, Namespace

Handler = Callable[[Namespace], int | None]
COMMANDS: dict[str, tuple[Callable[[], ArgumentParser], Handler]] = {}
GROUPS: dict[str, str] = {  # command groups with subcommands, and their one-line descriptions
    "tokenizer": "Byte-level BPE and WordPiece tokenizers.",
    "data": "Data curation and preparation.",
}


def command(path: str, parser: Callable[[], ArgumentParser]) -> Callable[[Handler], Handler]:
    """Register a subcommand ("pretrain", "tokenizer train") with its parser factory."""

    def register(fn: Handler) -> Handler:
        COMMANDS[path] = (parser, fn)
        return fn

    return register


def new_parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


def print_json(obj: Any) -> None:
    """Print `obj` as indented, key-sorted JSON."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
