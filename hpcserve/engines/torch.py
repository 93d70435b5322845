"""The torch reference engine: SGLang's flags plus --torch-* options, run by hpcserve's own Python."""

from __future__ import annotations

from hpcserve.engines.base import WorkerLaunch, register, sglang_server_flags


class TorchEngine:
    name = "torch"
    uses_hpcserve_python = True

    def argv(self, w: WorkerLaunch) -> list[str]:
        out = [w.python, "-m", "hpcserve.torchengine", *sglang_server_flags(w)]
        for key, value in w.options.items():
            out += [f"--torch-{key}", str(value)]
        return out


register(TorchEngine())
