"""Check `python -m sglang.launch_server` command lines with SGLang's own argument parser.

Pure parsing, no GPU: the parser SGLang builds (``ServerArgs.add_cli_args``) reads the argv and
``ServerArgs.from_cli_args`` turns it into a record. In sglang 0.5.23 ``ServerArgs.__post_init__``
is empty; everything that needs CUDA, the model's config.json or the network happens later in
``ServerArgs.resolve_once`` / ``check_server_args``, which this module never calls. A few of the
startup assertions of ``check_server_args`` that need only the parsed values are restated in
``_startup_assertions`` so that they fail here and not an hour into a GPU job.

sglang is imported lazily, on the first check: hpcserve itself and the login node never need it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

PINNED_VERSION = "0.5.23"   # the release whose parser the tests and docs/sglang-check.md describe

_unavailable_reason: str | None = None


def sglang_available() -> bool:
    """True when ``sglang.srt.server_args`` imports here. Never raises; the result is cached."""
    try:
        _server_args_class()
        return True
    except Exception:   # noqa: BLE001 - any failure to import means "not available"
        return False


def sglang_unavailable_reason() -> str | None:
    """Why sglang did not import (e.g. "No module named 'triton'"), or None when it did."""
    sglang_available()
    return _unavailable_reason


def sglang_version() -> str | None:
    """The installed sglang distribution's version, read from metadata without importing it."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


_server_args_cls: Any = None


def _server_args_class() -> Any:
    """sglang's ServerArgs, imported on first use; a failed import is remembered, not retried."""
    global _server_args_cls, _unavailable_reason
    if _server_args_cls is not None:
        return _server_args_cls
    if _unavailable_reason is None:
        environ = dict(os.environ)
        try:
            # importing sglang sets cache-dir variables (TRITON_CACHE_DIR, ...) and warning filters;
            # undo both so processes hpcserve starts later do not inherit them
            with warnings.catch_warnings():
                from sglang.srt.server_args import ServerArgs
            _server_args_cls = ServerArgs
            return ServerArgs
        except BaseException as exc:   # a native extension can also end in SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            _unavailable_reason = f"{type(exc).__name__}: {exc}"
        finally:
            os.environ.clear()
            os.environ.update(environ)
    raise ImportError(f"sglang is not importable here ({_unavailable_reason}); "
                      f"see docs/sglang-check.md for the CPU-only install")


class _ParserStop(Exception):
    """argparse called error()/exit(): raised instead of printing usage and exiting the process."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):   # type: ignore[override]
        raise _ParserStop(message)

    def exit(self, status: int = 0, message: str | None = None):   # type: ignore[override]
        raise _ParserStop((message or "").strip() or f"argparse wanted to exit with status {status}")


@dataclass
class _Parser:
    parser: argparse.ArgumentParser
    by_option: dict[str, argparse.Action]   # every option string -> its action
    required: list[argparse.Action]          # required in SGLang; checked here so parsing goes on
    long_options: list[str]


@functools.lru_cache(maxsize=2)
def _parser(allow_abbrev: bool) -> _Parser:
    server_args = _server_args_class()
    # launch_server builds argparse.ArgumentParser(prog="sglang serve") with the default allow_abbrev=True
    parser = _RaisingParser(prog="sglang serve", exit_on_error=False, allow_abbrev=allow_abbrev)
    server_args.add_cli_args(parser)
    required = [a for a in parser._actions if a.required]
    for action in required:
        action.required = False   # a missing --model-path must not hide the other mistakes
    by_option = {o: a for a in parser._actions for o in a.option_strings}
    return _Parser(parser, by_option, required, sorted(o for o in by_option if o.startswith("--")))


@dataclass
class ArgvCheck:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # deprecated flags, abbreviations
    server_args: Any = None                              # the unresolved ServerArgs record, when parsed


def check_argv(argv: list[str], *, allow_abbrev: bool = True) -> list[str]:
    """Errors SGLang's parser finds in ``argv`` (the list after ``-m sglang.launch_server``).

    An empty list means accepted. Raises ImportError when sglang is not importable (see
    ``sglang_available``). ``allow_abbrev=False`` also rejects prefixes such as ``--tp`` for
    ``--tp-size``, which SGLang accepts today but which break when a release adds a flag that
    shares the prefix.
    """
    return check(argv, allow_abbrev=allow_abbrev).errors


def check(argv: list[str], *, allow_abbrev: bool = True) -> ArgvCheck:
    """Like ``check_argv`` but also returns warnings and the parsed (unresolved) ServerArgs."""
    p = _parser(allow_abbrev)
    out = ArgvCheck()
    if any(a in ("-h", "--help") for a in argv):
        out.errors.append("-h/--help prints SGLang's help and exits: remove it from the engine args")
        return out
    with _capture_sglang_warnings(out.warnings):
        namespace = _parse_collecting_errors(p, [str(a) for a in argv], out.errors)
    if namespace is None:
        return out
    for action in p.required:
        if getattr(namespace, action.dest, None) is None:
            out.errors.append(f"missing required flag {_names(action)}")
    out.warnings += _spelling_warnings(p, argv)
    if out.errors:
        return out
    try:
        out.server_args = _server_args_class().from_cli_args(namespace)
    except Exception as exc:   # noqa: BLE001 - report whatever SGLang raised, as one line
        out.errors.append(f"sglang rejected the arguments: {type(exc).__name__}: {exc}")
        return out
    out.errors += _startup_assertions(namespace)
    return out


def flag_info(flag: str) -> dict[str, Any] | None:
    """What SGLang's parser says about one flag (exact option string, e.g. "--tp-size"), or None.

    Keys: names (all option strings), dest, kind ("switch", "on/off" for --X/--no-X, "value",
    "list" for nargs +/*/?), type, default, choices, required. Raises ImportError without sglang.
    """
    p = _parser(True)
    action = p.by_option.get(flag)
    if action is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        kind = "on/off"
    elif action.nargs == 0:
        kind = "switch"
    elif action.nargs in ("+", "*", "?"):
        kind = f"list (nargs={action.nargs})" if action.nargs != "?" else "optional value"
    else:
        kind = "value"
    return {"names": list(action.option_strings), "dest": action.dest, "kind": kind,
            "type": getattr(action.type, "__name__", None) if action.type else None,
            "default": action.default, "choices": list(action.choices) if action.choices else None,
            "required": action in p.required}


def _parse_collecting_errors(p: _Parser, argv: list[str], errors: list[str]) -> argparse.Namespace | None:
    """Parse; on a bad value drop that flag and parse again, so one run reports every bad value.

    Returns the namespace of what did parse (None when parsing had to stop), errors appended."""
    remaining = list(argv)
    for _ in range(len(argv) + 1):
        try:
            namespace, extras = p.parser.parse_known_args(remaining)
        except argparse.ArgumentError as exc:
            message = _describe_argument_error(exc)
            if message not in errors:
                errors.append(message)
            shorter = _drop_flag(p, remaining, exc.argument_name)
            if shorter == remaining:
                return None
            remaining = shorter
            continue
        except _ParserStop as exc:   # ambiguous abbreviation, retired flag with an error message
            errors.append(str(exc))
            return None
        except Exception as exc:   # noqa: BLE001 - a type function raising something unexpected
            errors.append(f"sglang's parser failed: {type(exc).__name__}: {exc}")
            return None
        errors += _describe_extras(p, argv, extras)
        return namespace
    return None


def _describe_argument_error(exc: argparse.ArgumentError) -> str:
    message = exc.message
    for type_name, plain in (("loads", "JSON"), ("json_list_type", "JSON list"),
                             ("human_readable_int", "integer (e.g. 32768 or 32k)")):
        message = message.replace(f"invalid {type_name} value", f"invalid {plain} value")
    return f"{exc.argument_name}: {message}" if exc.argument_name else message


def _drop_flag(p: _Parser, argv: list[str], argument_name: str | None) -> list[str]:
    """argv without the first occurrence of the named flag and the values that follow it."""
    options = set((argument_name or "").split("/"))
    for i, token in enumerate(argv):
        action = _action_for(p, token)
        if action is not None and options & set(action.option_strings):
            end = i + 1
            if "=" not in token:
                while end < len(argv) and not _looks_like_flag(argv[end]):
                    end += 1
            return argv[:i] + argv[end:]
    return argv


def _action_for(p: _Parser, token: str) -> argparse.Action | None:
    if not token.startswith("--"):
        return None
    name = token.split("=", 1)[0]
    if name in p.by_option:
        return p.by_option[name]
    matches = {id(a): a for o, a in p.by_option.items() if o.startswith(name)} if p.parser.allow_abbrev else {}
    return next(iter(matches.values())) if len(matches) == 1 else None


def _looks_like_flag(token: str) -> bool:
    return token.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?", token)


def _describe_extras(p: _Parser, argv: list[str], extras: list[str]) -> list[str]:
    """Unknown flags (with a close match) and stray values (e.g. `--trust-remote-code true`)."""
    out: list[str] = []
    positions = _positions_in(argv, extras)
    after_unknown_flag = False
    for token, pos in zip(extras, positions):
        if _looks_like_flag(token):
            after_unknown_flag = True
            out.append(_unknown_flag_message(p, token.split("=", 1)[0]))
        elif after_unknown_flag:
            continue   # the value of the unknown flag just reported
        else:
            previous = argv[pos - 1] if pos > 0 else None
            action = _action_for(p, previous) if previous else None
            if action is not None and action.nargs == 0:
                out.append(f"unexpected value {token!r} after {previous}: that flag is a switch and takes "
                           f"no value (write the bare flag for true, omit it for false)")
            else:
                out.append(f"unexpected value {token!r}" + (f" after {previous}" if previous else ""))
    return out


def _positions_in(argv: list[str], extras: list[str]) -> list[int]:
    """Index in argv of each extra, in order (extras are a subsequence of argv)."""
    positions, start = [], 0
    for token in extras:
        i = argv.index(token, start) if token in argv[start:] else start
        positions.append(i)
        start = i + 1
    return positions


def _unknown_flag_message(p: _Parser, name: str) -> str:
    dashed = name.replace("_", "-")
    if dashed != name and dashed in p.by_option:
        return f"unknown flag {name}: SGLang spells it {dashed}"
    prefixed = [o for o in p.long_options if o.startswith(name)]
    close = prefixed if 0 < len(prefixed) <= 3 else difflib.get_close_matches(name, p.long_options, n=3, cutoff=0.75)
    if close:
        return f"unknown flag {name} (did you mean {' or '.join(close)}?)"
    return f"unknown flag {name} for sglang {sglang_version() or '?'}"


def _spelling_warnings(p: _Parser, argv: list[str]) -> list[str]:
    """Abbreviated flags, and flags given twice (argparse keeps the last value without a word)."""
    out, seen = [], {}
    for token in argv:
        name = str(token).split("=", 1)[0]
        action = _action_for(p, name)
        if action is None:
            continue
        if name not in p.by_option:
            full = next(o for o in action.option_strings if o.startswith(name))
            out.append(f"{name} is accepted as an abbreviation of {full}; spell out {full} "
                       f"(abbreviations break when a release adds a flag with the same prefix)")
        if action.dest in seen and action.option_strings[0] not in ("--config",):
            out.append(f"{name} given twice (also as {seen[action.dest]}): SGLang keeps only the last value")
        seen.setdefault(action.dest, name)
    return out


def _names(action: argparse.Action) -> str:
    first, *aliases = action.option_strings
    return first + (f" (alias {', '.join(aliases)})" if aliases else "")


def _startup_assertions(ns: argparse.Namespace) -> list[str]:
    """Assertions sglang 0.5.23 makes at startup (validation_hook.check_server_args) that need only
    the parsed values, plus node-rank range and JSON syntax, which would otherwise fail on the GPUs."""
    out = []
    nnodes, node_rank = ns.nnodes, ns.node_rank
    if getattr(ns, "ep_join_mode", None) != "scale" and nnodes > 0 and (ns.tp_size * ns.pp_size) % nnodes:
        out.append(f"--tp-size {ns.tp_size} x --pp-size {ns.pp_size} must be divisible by --nnodes {nnodes}")
    if _replica_dp(ns) > 1 and nnodes != 1:
        out.append(f"--dp-size {ns.dp_size} with --nnodes {nnodes}: sglang does not support multi-node "
                   "data-parallel replicas (use --attn-dp-size across nodes, or one replica per group)")
    if not 0 <= node_rank < max(nnodes, 1):
        out.append(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}")
    if nnodes > 1 and not ns.dist_init_addr:
        out.append(f"--nnodes {nnodes} needs --dist-init-addr HOST:PORT (the rank-0 node's address)")
    if ns.served_model_name and ":" in ns.served_model_name and "://" not in ns.served_model_name:
        out.append(f"--served-model-name {ns.served_model_name!r}: sglang forbids ':' there "
                   "(reserved for model:adapter LoRA syntax)")
    raw = getattr(ns, "json_model_override_args", None)
    if raw:
        try:
            if not isinstance(json.loads(raw), dict):
                out.append("--json-model-override-args must be a JSON object")
        except ValueError as exc:
            out.append(f"--json-model-override-args is not valid JSON: {exc}")
    return out


def _replica_dp(ns: argparse.Namespace) -> int:
    """Data-parallel replicas as SGLang counts them after resolving: the deprecated ``--dp-size N
    --enable-dp-attention`` means attention DP of width N and ONE replica (parallel_hook
    _handle_deprecated_dp_attention), which may span nodes."""
    if getattr(ns, "enable_dp_attention", False) and getattr(ns, "attn_dp_size", 1) in (1, None):
        return 1
    return ns.dp_size


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))


class _capture_sglang_warnings:
    """Collect warnings sglang's parser logs (deprecated flags) instead of printing them."""

    def __init__(self, sink: list[str]):
        self.handler = _ListHandler(sink)
        self.logger = logging.getLogger("sglang")

    def __enter__(self):
        self.propagate = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate
