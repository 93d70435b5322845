"""The mock engine: SGLang's flags plus --mock-* timing options, run by hpcserve's own Python."""

from __future__ import annotations

from hpcserve.engines.base import WorkerLaunch, register, sglang_server_flags


class MockEngine:
    name = "mock"
    uses_hpcserve_python = True

    def argv(self, w: WorkerLaunch) -> list[str]:
        out = [w.python, "-m", "hpcserve.mock", *sglang_server_flags(w)]
        for key, value in w.options.items():
            out += [f"--mock-{key}", str(value)]
        return out


register(MockEngine())
