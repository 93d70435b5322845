"""Request errors of a stand-in engine's HTTP API, in SGLang's two shapes (native and OpenAI)."""

from __future__ import annotations

from hpcserve.http.parse import error_body as shaped_error


class EngineError(Exception):
    """A request the engine refuses or cannot finish: HTTP status, message and SGLang's error type."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_body(status: int, message: str, kind: str = "BadRequestError") -> bytes:
    """SGLang's native error object (the two shapes are built in one place: hpcserve.http.parse)."""
    return shaped_error(status, message, kind)


def oai_error(status: int, message: str, kind: str = "BadRequestError") -> bytes:
    """SGLang's OpenAI-style error object, what it answers on /v1/*."""
    return shaped_error(status, message, kind, b"/v1/")
