"""mkdocs hooks of the documentation site (mkdocs.yml): the command reference is made from the
parser itself, so it cannot drift from the flags the command takes.

A page holding the line ``<!-- ddpm-cli-reference -->`` gets, in its place, one section per
``ddpm`` subcommand with that subcommand's ``--help`` text.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- ddpm-cli-reference -->"


def cli_reference() -> str:
    """Markdown: the top-level help, then each subcommand's help, in the parser's order."""
    from ddpm.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it for a stable page
    parser = build_parser()
    parts = ["## ddpm", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subcommands(parser).items():
        parts += [f"## ddpm {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of each subcommand, in the order they were added."""
    for action in parser._actions:  # argparse has no public accessor for its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
