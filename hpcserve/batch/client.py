"""Sending one row to the router: a pooled aiohttp session, per-attempt timeouts, bounded retries.

Outcomes of a row:
- ``Answer``: the output line to write (a result, or an error row for a definitive failure: a 4xx other
  than 408/429, or an answer of the wrong shape);
- ``Transient``: retries are used up on failures that say more about the service than about the row
  (could not connect, timeout, 5xx, 408, 429). The driver decides whether that becomes an error row or,
  when many rows in a row fail like this, stops the batch so the rows are redone on restart;
- ``Abandoned``: the batch is stopping and the row was not finished; it will be redone on restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from hpcserve.batch.rows import CHAT, Request, error_row, ok_row, parse_response

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
        self.base = router_url.rstrip("/")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.connect_timeout = min(connect_timeout, request_timeout)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.session: aiohttp.ClientSession | None = None
        self._model_lock = asyncio.Lock()
        self.stopping = False  # set by the driver: no new attempts, no more backoff sleeps

    async def __aenter__(self) -> "RouterClient":
        connector = aiohttp.TCPConnector(limit=self.concurrency + 4, limit_per_host=0,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self.headers,
                                             skip_auto_headers=("User-Agent",), raise_for_status=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.session is not None:
            await self.session.close()

    async def _chat_model(self) -> str:
        """The model name for chat rows without one: given, else the router's first /v1/models entry."""
        if self.model is not None:
            return self.model
        async with self._model_lock:
            if self.model is None:
                name = "default"
                try:
                    async with self.session.get(self.base + "/v1/models",
                                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status == 200:
                            data = orjson.loads(await resp.read()).get("data") or []
                            name = data[0]["id"] if data else name
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
                    log.warning("could not read the model name from %s/v1/models (%s); using %r",
                                self.base, e, name)
                    return name  # not cached: ask again for the next row
                self.model = name
        return self.model

    async def run(self, req: Request) -> Answer | Transient | Abandoned:
        body = req.body
        if req.path == CHAT and "model" not in body:
            body = {**body, "model": await self._chat_model()}
        data = orjson.dumps(body)
        url = self.base + req.path
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
                async with self.session.post(url, data=data) as resp:
                    raw = await resp.read()
                    status = resp.status
                    hint = _seconds(resp.headers.get("Retry-After"))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                reason, hint = f"{type(e).__name__}: {e}", None
                continue
            except asyncio.TimeoutError:
                reason, hint = f"no answer within {self.request_timeout:g} s", None
                continue
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


def _seconds(value: str | None) -> float | None:
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
