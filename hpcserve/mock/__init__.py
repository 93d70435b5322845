"""SGLang-API-compatible mock engine (see docs/mock-engine.md): `python -m hpcserve.mock ARGS`."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from hpcserve.mock.app import main as _main
    return _main(argv)


__all__ = ["main"]
