"""Every ``rayrec`` command prints its help (argparse formats help strings with ``%``)."""

from __future__ import annotations

import argparse

from cluster.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _commands(child, (*path, name))
    return found


def test_every_command_formats_its_help() -> None:
    parser = build_parser()
    commands = _commands(parser)
    assert ("simulate",) in commands and ("train",) in commands
    for path in commands:
        node = parser
        for name in path:
            sub = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction))
            node = sub.choices[name]
        assert node.format_help().startswith("usage: rayrec"), path
