"""Request errors of the torch engine's HTTP API: the mock engine's, since both answer in SGLang's shapes."""

from __future__ import annotations

from hpcserve.mock.engine import EngineError as RequestError
from hpcserve.mock.server import error_body, oai_error

__all__ = ["RequestError", "error_body", "oai_error"]
