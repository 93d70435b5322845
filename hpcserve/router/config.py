"""Command-line options of ``python -m hpcserve.router``: hpcserve/cmdline/router.py's RouterArgs owns them
(names, defaults, checks), the same class the planner writes the head node's router argv with."""

from __future__ import annotations

from hpcserve.cmdline.router import RouterArgs
from hpcserve.errors import UsageError

__all__ = ["RouterArgs", "UsageError", "build_parser", "parse_args"]


def build_parser():
    return RouterArgs.parser()


def parse_args(argv: list[str] | None) -> RouterArgs:
    return RouterArgs.from_argv(argv).resolve()
