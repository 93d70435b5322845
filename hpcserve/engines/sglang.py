"""SGLang: `python -m sglang.launch_server` with the flags of docs/design.md "SGLang PD protocol" (0.5.x names)."""

from __future__ import annotations

from hpcserve.engines.base import WorkerLaunch, register, sglang_server_flags


class SGLangEngine:
    name = "sglang"
    uses_hpcserve_python = False
    reads_model_config = True      # hpcserve doctor checks MODEL/config.json is readable where it runs

    def argv(self, w: WorkerLaunch) -> list[str]:
        return [w.python, "-m", "sglang.launch_server", *sglang_server_flags(w)]


register(SGLangEngine())
