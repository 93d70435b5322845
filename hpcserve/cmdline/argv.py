"""A pydantic model whose fields are command-line flags: it writes argv and parses argv with the same names.

Field order is argv order. ``to_argv()`` writes the fields the caller set (``model_fields_set``), so a
planner writes only what it decided and the process keeps its own defaults for the rest; parsing leaves
unset flags unset, so ``from_argv(x.to_argv()) == x``. Flag spellings: ``--field-name`` plus ``Flag``'s
aliases; a field without ``Flag`` metadata is a resolved value, never a flag.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from hpcserve.errors import UsageError


@dataclass(frozen=True)
class Flag:
    aliases: tuple[str, ...] = ()      # other spellings, e.g. ("--tensor-parallel-size",)
    group: str | None = None           # help section
    planned: bool = False              # set by the planner: a user engine arg of this name would fight it
    env: str | None = None             # value from this environment variable when the flag is absent
    nargs: str | None = None
    metavar: str | tuple[str, ...] | None = None


def flag(*aliases: str, **kw: Any) -> Flag:
    return Flag(aliases=aliases, **kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:   # one line, no usage dump
        raise UsageError(message)


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


class ArgsModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prog: ClassVar[str] = ""
    description: ClassVar[str | None] = None
    groups: ClassVar[tuple[str, ...]] = ()     # help sections, in the order help shows them

    @classmethod
    def flags(cls) -> dict[str, Flag]:
        """field name -> its Flag, in argv order."""
        return {name: next(m for m in f.metadata if isinstance(m, Flag))
                for name, f in cls.model_fields.items() if any(isinstance(m, Flag) for m in f.metadata)}

    @classmethod
    def spellings(cls, name: str) -> list[str]:
        return ["--" + name.replace("_", "-"), *cls.flags()[name].aliases]

    @classmethod
    def planned_flags(cls) -> frozenset[str]:
        """Every spelling (without --) of the flags the planner sets."""
        return frozenset(s[2:] for name, f in cls.flags().items() if f.planned for s in cls.spellings(name))

    # ---- writing

    def to_argv(self) -> list[str]:
        out: list[str] = []
        for name in self.flags():
            value = getattr(self, name)
            if name not in self.model_fields_set or value is None or value is False:
                continue
            opt = self.spellings(name)[0]
            if value is True:
                out.append(opt)
            elif isinstance(value, list):
                for item in value:
                    out += [opt, *map(str, item)] if isinstance(item, (tuple, list)) else [opt, str(item)]
            else:
                out += [opt, str(value)]
        return out

    # ---- parsing

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this class's flags to ``parser`` (a process layers its own flags on top). Absent flags stay
        absent from the namespace (argparse.SUPPRESS): the model's defaults are the only defaults."""
        sections = {g: parser.add_argument_group(g) for g in cls.groups}
        for name, f in cls.flags().items():
            field = cls.model_fields[name]
            kind = _base_type(field.annotation)
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field)}
            if field.is_required():
                kw["required"] = True
            if kind is bool:
                kw["action"] = "store_true"
            else:
                if typing.get_origin(kind) is list:
                    kw["action"] = "append"
                    kind = typing.get_args(kind)[0]
                if typing.get_origin(kind) is tuple:
                    kind = str        # converted by the model (e.g. URL PORT pairs)
                if typing.get_origin(kind) is Literal:
                    kw["choices"] = typing.get_args(kind)
                    kind = type(kw["choices"][0])
                kw["type"] = kind if kind in (int, float) else None
                if f.nargs:
                    kw["nargs"] = f.nargs
                if f.metavar:
                    kw["metavar"] = f.metavar
            (sections[f.group] if f.group else parser).add_argument(*cls.spellings(name), **kw)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = _Parser(prog=cls.prog, description=cls.description, allow_abbrev=False)
        cls.add_arguments(p)
        return p

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        """The model from a parsed namespace (other processes' own flags in it are ignored); flags absent
        from argv take their value from ``Flag.env`` if set there, else stay at the model's default."""
        given = {k: v for k, v in vars(ns).items() if k in cls.model_fields}
        for name, f in cls.flags().items():
            if name not in given and f.env and os.environ.get(f.env):
                given[name] = os.environ[f.env]
        return cls(**cls.prepare(given))

    @classmethod
    def prepare(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Hook: turn parsed strings into field values (raise UsageError with the flag's name)."""
        return given

    @classmethod
    def from_argv(cls, argv: list[str] | None):
        return cls.from_namespace(cls.parser().parse_args(argv))


def _help(field: Any) -> str | None:
    text = field.description
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default in (None, False, [], ()):
        return text
    return f"{text} (default {default})" if text else f"default {default}"
