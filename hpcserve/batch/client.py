"""Sending one row to the router: the router's own pooled keep-alive HTTP/1.1 client (hpcserve.http
UpstreamPool.exchange), per-attempt timeouts, bounded retries.

Outcomes of a row:
- ``Answer``: the output line to write (a result, or an error row for a definitive failure: a 4xx other
  than 408/429, or an answer of the wrong shape);
- ``Transient``: retries are used up on failures that say more about the service than about the row
  (could not connect, timeout, connection lost, 5xx, 408, 429). The driver decides whether that becomes an
  error row or, when many rows in a row fail like this, stops the batch so the rows are redone on restart;
- ``Abandoned``: the batch is stopping and the row was not finished; it will be redone on restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from hpcserve.batch.rows import GENERATE, Request, error_row, ok_row, parse_response
from hpcserve.errors import HpcserveError
from hpcserve.http import UpstreamError, UpstreamPool

log = logging.getLogger("hpcserve.batch")
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(slots=True)
class Answer:
    line: bytes
    ok: bool


@dataclass(slots=True)
class Transient:
    line: bytes  # the error row to write if the driver decides the row itself failed
    reason: str


class Abandoned:
    pass


ABANDONED = Abandoned()


class RouterClient:
    def __init__(self, router_url: str, *, concurrency: int, max_retries: int, request_timeout: float,
                 api_key: str | None = None, model: str | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 20.0, connect_timeout: float = 10.0) -> None:
        url = urlsplit(router_url if "://" in router_url else f"http://{router_url}")
        if url.scheme != "http" or not url.hostname:
            raise HpcserveError(f"router URL {router_url!r} must look like http://HOST:PORT "
                                "(the router serves plain HTTP on the head node)")
        try:
            self.port = url.port or 80
        except ValueError:
            raise HpcserveError(f"router URL {router_url!r} has an invalid port") from None
        self.host = url.hostname
        self.prefix = url.path.rstrip("/").encode()
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.connect_timeout = min(connect_timeout, request_timeout)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.model = model
        self.extra = f"authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self.pool: UpstreamPool | None = None
        self._model_lock = asyncio.Lock()
        self.stopping = False  # set by the driver: no new attempts, no more backoff sleeps

    async def __aenter__(self) -> "RouterClient":
        self.pool = UpstreamPool(self.host, self.port, connect_timeout=self.connect_timeout,
                                 max_idle=self.concurrency + 8)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.close()

    async def _model_name(self) -> str:
        """The model name for OpenAI rows without one: given, else the router's first /v1/models entry."""
        if self.model is not None:
            return self.model
        async with self._model_lock:
            if self.model is None:
                name = "default"
                try:
                    reply = await self.pool.exchange(b"GET", self.prefix + b"/v1/models", timeout=10,
                                                     extra=self.extra)
                    if reply.status == 200:
                        data = orjson.loads(reply.body).get("data") or []
                        name = data[0]["id"] if data else name
                except (UpstreamError, ValueError, KeyError, TypeError, AttributeError) as e:
                    log.warning("could not read the model name from /v1/models (%s); using %r", e, name)
                    return name  # not cached: ask again for the next row
                self.model = name
        return self.model

    async def run(self, req: Request) -> Answer | Transient | Abandoned:
        body = req.body
        if req.path != GENERATE and "model" not in body:  # OpenAI routes need a model name
            body = {**body, "model": await self._model_name()}
        data = orjson.dumps(body)
        path = self.prefix + req.path.encode()
        start = time.monotonic()
        reason, hint = "", None
        for attempt in range(self.max_retries + 1):
            if self.stopping:
                return ABANDONED
            if attempt:
                await asyncio.sleep(self._backoff(attempt, hint))
                if self.stopping:
                    return ABANDONED
            try:
                reply = await self.pool.exchange(b"POST", path, data, timeout=self.request_timeout,
                                                 extra=self.extra)
            except UpstreamError as e:  # could not connect, timed out, or the connection broke off
                reason, hint = f"{type(e).__name__}: {e}", None
                continue
            status, raw = reply.status, reply.body
            hint = _seconds(reply.header(b"retry-after"))
            if status == 200:
                try:
                    payload = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return Answer(error_row(req.id, f"{req.path}: answer is not JSON: {_short(raw, 80)}"), False)
                try:
                    text, p_tok, c_tok, finish = parse_response(req.path, payload)
                except ValueError as e:
                    return Answer(error_row(req.id, f"{req.path}: {e}"), False)
                return Answer(ok_row(req.id, text, p_tok, c_tok, finish, time.monotonic() - start), True)
            reason = f"HTTP {status}: {_short(raw)}"
            if status not in RETRYABLE_STATUS:
                return Answer(error_row(req.id, f"{req.path}: {reason}"), False)
        tries = self.max_retries + 1
        return Transient(error_row(req.id, f"{req.path}: failed after {tries} attempts: {reason}"), reason)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential with jitter (so rows that failed together do not retry together); a server's
        Retry-After wins, capped like the rest."""
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        delay = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return delay * (0.5 + random.random() / 2)


def _seconds(value: bytes | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: ignore it and use the exponential backoff


def _short(raw: bytes, limit: int = 300) -> str:
    """The message of an error body (OpenAI/SGLang shapes), else its first bytes."""
    try:
        obj = orjson.loads(raw)
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            if isinstance(err, dict):
                err = err.get("message", err)
            if isinstance(obj.get("detail"), str):
                err = obj["detail"]
            return str(err)[:limit]
    except ValueError:
        pass
    return raw[:limit].decode("utf-8", "replace")
