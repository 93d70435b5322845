"""Dynamo workers: `python -m dynamo.mocker` (Dynamo's simulated engine, no GPU) and `python -m dynamo.sglang`
(SGLang inside Dynamo's runtime, SGLang's own flags). The stack (hpcserve/stacks/dynamo.py) chooses between
them and wires them to the frontend through Dynamo's environment; only engine flags live here.

Each class also checks a command line with Dynamo's own argument parser (`hpcserve validate --engine-check`).
"""

from __future__ import annotations

import contextlib
import io
import re

from hpcserve.engines.base import WorkerLaunch, args_to_flags, register, sglang_server_flags
from hpcserve.errors import HpcserveError

_ERROR_PREFIX = re.compile(r"^\S*: error: ")   # argparse's "PROG: error: " (PROG is "-" when imported)


def _parse_errors(parse, argv: list[str]) -> list[str]:
    """Run an argparse-based parser; its complaints (usage errors exit 2, validation raises) as lines."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
            return [_ERROR_PREFIX.sub("", ln) for ln in lines[-1:]] or [f"the parser exited with {e.code}"]
    except (ValueError, TypeError) as e:
        return [str(e)]
    return []


def _dynamo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ai-dynamo")
    except PackageNotFoundError:
        return "not installed"


class DynamoMocker:
    """dynamo.mocker: Dynamo's engine simulator (KV cache and timing model) on CPU; run by hpcserve's Python."""

    name = "dynamo-mocker"
    selectable = False        # chosen by the Dynamo stack for engine.kind mock, never named in a recipe
    module = "dynamo.mocker"
    uses_hpcserve_python = True

    def argv(self, w: WorkerLaunch) -> list[str]:
        out = [w.python, "-m", self.module, "--model-path", w.model_path, "--model-name", w.served_name]
        if w.mode != "null":
            out += ["--disaggregation-mode", w.mode]
        if w.mode == "prefill" and w.bootstrap_port:
            out += ["--bootstrap-ports", str(w.bootstrap_port)]
        scale = w.options.get("time-scale")   # the mock's delay multiplier is the mocker's speedup inverted
        if scale is not None:
            out += ["--speedup-ratio", str(1.0 / float(scale)) if float(scale) > 0 else "0"]
        return out + args_to_flags(w.user_args)

    def check_argv(self, args: list[str]) -> list[str]:
        try:
            from dynamo.mocker.args import parse_args
        except ImportError as e:
            raise HpcserveError(f"--engine-check of dynamo.mocker needs ai-dynamo importable here ({e}); "
                                f"pip install 'hpcserve[dynamo]' (see docs/dynamo.md)") from None
        return _parse_errors(parse_args, args)

    def check_note(self) -> str:
        return f"engine check: {self.module}'s parser (ai-dynamo {_dynamo_version()})"


class DynamoSGLang:
    """dynamo.sglang: SGLang's engine behind Dynamo's runtime; SGLang's flags, run by the engine's Python."""

    name = "dynamo-sglang"
    selectable = False        # chosen by the Dynamo stack for engine.kind sglang
    module = "dynamo.sglang"
    uses_hpcserve_python = False

    def argv(self, w: WorkerLaunch) -> list[str]:
        return [w.python, "-m", self.module, *sglang_server_flags(w)]

    def check_argv(self, args: list[str]) -> list[str]:
        try:   # imports sglang's engine (torch, torchvision, CUDA kernels): importable on GPU nodes, not always here
            import asyncio

            from dynamo.sglang.args import parse_args
        except Exception as e:   # noqa: BLE001 - any import failure means "cannot check here"
            raise HpcserveError(f"--engine-check of dynamo.sglang needs dynamo.sglang importable here "
                                f"({type(e).__name__}: {e}); run it where the engine image's Python is") from None
        return _parse_errors(lambda a: asyncio.run(parse_args(a)), args)

    def check_note(self) -> str:
        return f"engine check: {self.module}'s parser (ai-dynamo {_dynamo_version()})"


register(DynamoMocker())
register(DynamoSGLang())
