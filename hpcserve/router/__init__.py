"""hpcserve's head-node router: OpenAI/SGLang API in front of prefill/decode or aggregated workers."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from hpcserve.router.main import main as _main
    return _main(argv)


__all__ = ["main"]
