"""Request errors of a stand-in engine's HTTP API, in SGLang's two shapes (native and OpenAI)."""

from __future__ import annotations

import orjson


class EngineError(Exception):
    """A request the engine refuses or cannot finish: HTTP status, message and SGLang's error type."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_body(status: int, message: str, kind: str = "BadRequestError") -> bytes:
    """SGLang's native error object."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def oai_error(status: int, message: str, kind: str = "BadRequestError") -> bytes:
    """SGLang's OpenAI-style error object."""
    return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})
