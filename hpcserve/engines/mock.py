"""The mock engine: SGLang's flags plus --mock-* timing options, run by hpcserve's own Python."""

from __future__ import annotations

from hpcserve.engines.base import WorkerLaunch, register, sglang_server_flags


class StandInEngine:
    """An SGLang stand-in that ships with hpcserve: SGLang's server flags plus ``--<name>-<option>`` ones."""

    uses_hpcserve_python = True

    def __init__(self, name: str, module: str) -> None:
        self.name, self.module = name, module

    def argv(self, w: WorkerLaunch) -> list[str]:
        out = [w.python, "-m", self.module, *sglang_server_flags(w)]
        for key, value in w.options.items():
            out += [f"--{self.name}-{key}", str(value)]
        return out


register(StandInEngine("mock", "hpcserve.mock"))
