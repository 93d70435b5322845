"""The router's HTTP surface: one route table, auth, limits, JSON errors, request ids and metrics around
the dispatcher. Every answer to a client mistake is a 4xx with a JSON ``error`` object, never a 500."""

from __future__ import annotations

import hmac
import os
import time
from urllib.parse import unquote

import orjson

from hpcserve.http import HttpConnection, Request, UpstreamError, error_body
from hpcserve.http.server import needle
from hpcserve.router.dispatch import Dispatcher
from hpcserve.router.pd import Pair
from hpcserve.router.single import Single
from hpcserve.router.follower import RegistryFollower, redact_url
from hpcserve.router.limiter import Limiter, Overloaded
from hpcserve.router.metrics import RouterMetrics
from hpcserve.router.policies import Policy, routing_key
from hpcserve.router.workers import WorkerSet

GENERATE_PATHS = (b"/generate", b"/v1/completions", b"/v1/chat/completions")
PROXY_GET_PATHS = (b"/model_info", b"/get_model_info", b"/server_info", b"/get_server_info")
OPEN_PATHS = (b"/health", b"/ready", b"/metrics")  # probes and scrapers need no key
H_REQUEST_ID = needle(b"x-request-id")
H_AUTHORIZATION = needle(b"authorization")
PROM_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _rid_ok(rid: bytes) -> bool:
    return 0 < len(rid) <= 128 and rid.isascii() and rid.decode().isprintable()


class RouterApp:
    def __init__(self, *, mode: str, workers: WorkerSet, dispatcher: Dispatcher, metrics: RouterMetrics,
                 limiter: Limiter, policies: dict[str, Policy], api_key: str | None = None,
                 served_model_name: str | None = None, follower: RegistryFollower | None = None) -> None:
        self.mode = mode
        self.workers = workers
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.limiter = limiter
        self.policies = policies
        self.api_key = api_key.encode() if api_key else None
        self.served_model_name = served_model_name
        self.follower = follower
        self.needs_key = any(p.needs_key for p in policies.values())
        self.started = time.time()
        self._rid_prefix = os.urandom(4).hex().encode()
        self._rid_n = 0
        self.routes = {p: (b"POST", None) for p in GENERATE_PATHS}
        self.routes.update({p: (b"GET", self._proxy_get) for p in PROXY_GET_PATHS})
        self.routes.update({
            b"/health": (b"GET", self._health), b"/ready": (b"GET", self._ready),
            b"/workers": (b"GET", self._workers), b"/metrics": (b"GET", self._metrics),
            b"/v1/models": (b"GET", self._models),
        })
        self.labels = {p: p.decode() for p in self.routes}

    # ---- entry point for every request (synchronous; returns a coroutine only for slow paths)
    def handle(self, req: Request, conn: HttpConnection):
        t0 = time.perf_counter()
        rid = req.header(H_REQUEST_ID) if req.lower.find(H_REQUEST_ID) >= 0 else None
        if rid is None or not _rid_ok(rid):
            self._rid_n += 1
            extra = b"x-request-id: %b-%d\r\n" % (self._rid_prefix, self._rid_n)
        else:
            extra = b"x-request-id: %b\r\n" % rid
        path = req.path
        route = self.routes.get(path)
        if route is None and path[:11] == b"/v1/models/":
            route = (b"GET", self._model_card)
        if route is None:
            status = self._error(conn, req.path, 404, f"no route {path.decode(errors='replace')}; see /v1/models, "
                                 "/v1/chat/completions, /v1/completions, /generate", extra, "not_found")
        elif req.method != route[0]:
            status = self._error(conn, req.path, 405, f"use {route[0].decode()} for {path.decode()}", extra,
                                 "method_not_allowed", b"allow: %b\r\n" % route[0])
        elif self.api_key is not None and path not in OPEN_PATHS and not self._authorized(req):
            status = self._error(conn, req.path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 extra, "authentication_error", b"www-authenticate: Bearer\r\n")
        elif route[1] is None:
            return self._generate(req, conn, extra, t0)
        else:
            return self._admin(route[1], req, conn, extra, t0)
        self.metrics.observe(self.labels.get(path, "other"), status, time.perf_counter() - t0)
        return None

    def finished(self, label: str, status: int, t0: float) -> None:
        """Called once per generation request when its answer is complete (or the client left)."""
        self.metrics.inflight -= 1
        self.limiter.leave()
        self.metrics.observe(label, status, time.perf_counter() - t0)

    async def _admin(self, fn, req: Request, conn: HttpConnection, extra: bytes, t0: float) -> None:
        status = 499
        try:
            status = await fn(req, conn, extra)
        finally:
            self.metrics.observe(self.labels.get(req.path, "/v1/models/{id}"), status, time.perf_counter() - t0)

    def _authorized(self, req: Request) -> bool:
        given = req.header(H_AUTHORIZATION) or b""
        if given[:7].lower() != b"bearer ":
            return False
        return hmac.compare_digest(given[7:].strip(), self.api_key)

    def _error(self, conn: HttpConnection, path: bytes, status: int, message: str, extra: bytes, kind: str,
               more: bytes = b"") -> int:
        conn.respond(status, error_body(status, message, kind, path), extra=extra + more)
        return status

    def _json(self, conn: HttpConnection, status: int, doc: object, extra: bytes) -> int:
        conn.respond(status, orjson.dumps(doc), extra=extra)
        return status

    # ---- generation
    def _generate(self, req: Request, conn: HttpConnection, extra: bytes, t0: float):
        label = self.labels[req.path]
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as err:
            status = self._error(conn, req.path, 400, f"request body is not valid JSON: {err}", extra,
                                 "invalid_request_error")
        else:
            if isinstance(body, dict):
                if self.limiter.try_enter():
                    return self._start(req, conn, body, extra, label, t0)
                return self._queued(req, conn, body, extra, label, t0)
            status = self._error(conn, req.path, 400, "request body must be a JSON object", extra,
                                 "invalid_request_error")
        self.metrics.observe(label, status, time.perf_counter() - t0)
        return None

    def _start(self, req: Request, conn: HttpConnection, body: dict, extra: bytes, label: str, t0: float):
        self.metrics.inflight += 1
        stream = body.get("stream") is True
        key = routing_key(body) if self.needs_key else None
        args = (self.dispatcher, conn, req.path, extra, stream, label, t0, key)
        if self.mode == "pd":
            ex = Pair(*args, body=body, raw=req.body)
        else:
            ex = Single(*args, raw=req.body)
        return ex.start(ex.take)

    async def _queued(self, req: Request, conn: HttpConnection, body: dict, extra: bytes, label: str,
                      t0: float) -> None:
        self.metrics.queued += 1
        try:
            await self.limiter.enter()
        except Overloaded as err:
            self.metrics.reject("queue_full" if err.status == 429 else "queue_timeout")
            status = self._error(conn, req.path, err.status, str(err), extra, "overloaded")
            self.metrics.observe(label, status, time.perf_counter() - t0)
            return
        finally:
            self.metrics.queued -= 1
        if conn.closed:
            self.limiter.leave()
            self.metrics.observe(label, 499, time.perf_counter() - t0)
            return
        pending = self._start(req, conn, body, extra, label, t0)
        if pending is not None:
            await pending

    # ---- admin and information
    async def _health(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        return self._json(conn, 200, {"status": "ok"}, extra)

    async def _ready(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        healthy = {role: len(ws) for role, ws in self.workers.healthy.items()}
        missing = self.workers.missing_roles()
        if missing:
            msg = "no healthy " + " and no healthy ".join(f"{r} worker" for r in missing)
            return self._json(conn, 503, {"ready": False, "mode": self.mode, "healthy": healthy, "missing": missing,
                                          "message": msg}, extra)
        return self._json(conn, 200, {"ready": True, "mode": self.mode, "healthy": healthy}, extra)

    async def _workers(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        doc: dict = {"mode": self.mode, "workers": [w.view() for w in self.workers.all()],
                     "policies": {role: p.describe() for role, p in self.policies.items()},
                     "inflight": self.metrics.inflight, "queued": self.limiter.waiting, "process": os.getpid()}
        if self.follower is not None:
            f = self.follower
            doc["registry"] = {"url": redact_url(f.url), "run_id": f.run_id, "connected": f.connected,
                               "last_error": f.last_error}
        return self._json(conn, 200, doc, extra)

    async def _metrics(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        conn.respond(200, self.metrics.render(), PROM_TYPE, extra)
        return 200

    def _info_worker(self):
        role = "decode" if self.mode == "pd" else "both"
        ws = self.workers.healthy.get(role) or self.workers.healthy.get("prefill") or []
        return ws[0] if ws else None

    async def _models(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        if self.served_model_name:
            return self._json(conn, 200, {"object": "list", "data": [
                {"id": self.served_model_name, "object": "model", "created": int(self.started),
                 "owned_by": "hpcserve", "root": self.served_model_name}]}, extra)
        return await self._proxy_get(req, conn, extra)

    async def _model_card(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        """GET /v1/models/{id}: the router's served name answers itself; otherwise a worker does."""
        name = self.served_model_name
        if not name:
            return await self._proxy_get(req, conn, extra)
        asked = unquote(req.path[11:].decode("latin-1"))
        if asked != name:  # SGLang's 404 body for an unknown model
            return self._json(conn, 404, {"error": {"message": f"The model '{asked}' does not exist",
                                                    "type": "invalid_request_error", "param": "model",
                                                    "code": "model_not_found"}}, extra)
        return self._json(conn, 200, {"id": name, "object": "model", "created": int(self.started),
                                      "owned_by": "hpcserve", "root": name, "parent": None}, extra)

    async def _proxy_get(self, req: Request, conn: HttpConnection, extra: bytes) -> int:
        w = self._info_worker()
        if w is None:
            return self._error(conn, req.path, 503, "no healthy worker to ask", extra, "no_workers")
        try:
            status, ctype, body = await w.pool.fetch(b"GET", req.path, timeout=30.0, extra=extra)
        except UpstreamError as err:
            return self._error(conn, req.path, 502, str(err), extra, "upstream_error")
        conn.respond(status, body, ctype, extra)
        return status
