"""Request errors of the torch engine's HTTP API."""

from __future__ import annotations

import orjson


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def oai_error(status: int, message: str, kind: str = "BadRequestError") -> bytes:
    """SGLang's OpenAI-style error object."""
    return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})
