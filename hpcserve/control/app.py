"""The FastAPI application: routes under /v1 behind the router's bearer key; /health, /metrics, /docs and
/openapi.json open (like the router's probes and scrapes). Every refusal is a 4xx with a one-line ``detail``."""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from redis.exceptions import RedisError

from hpcserve.control.models import ActionResult, EventList, GroupView, PolicyChange, RotationChange, RunView, WorkerView
from hpcserve.control.state import Control, ControlError


def create_app(control: Control, api_key: str | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await control.start()
        try:
            yield
        finally:
            await control.close()

    app = FastAPI(title="hpcserve control API", version="1",
                  description="The run, its workers and events; drain, restart, rotation and routing policy.",
                  lifespan=lifespan)

    def authorized(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        given = authorization or ""
        if given[:7].lower() != "bearer " or not hmac.compare_digest(given[7:].strip().encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ControlError)
    async def control_error(_: Request, err: ControlError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RedisError)
    async def redis_error(_: Request, err: RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"the run's Redis is not answering ({type(err).__name__}); try again"},
                            status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.get("/health", tags=["probe"])
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", tags=["probe"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text: workers by role and state, restarts, operator actions (docs/metrics.md)."""
        return PlainTextResponse(await control.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/run", response_model=RunView, tags=["read"])
    async def run() -> RunView:
        return await control.run()

    @v1.get("/workers", response_model=list[WorkerView], tags=["read"])
    async def workers() -> list[WorkerView]:
        return await control.workers()

    @v1.get("/workers/{worker_id}", response_model=WorkerView, tags=["read"])
    async def worker(worker_id: str) -> WorkerView:
        return (await control.workers(worker_id))[0]

    @v1.get("/groups", response_model=list[GroupView], tags=["read"])
    async def groups() -> list[GroupView]:
        return await control.group_views()

    @v1.get("/events", response_model=EventList, tags=["read"],
            responses={200: {"content": {"text/event-stream": {}}}})
    async def events(count: int = Query(50, ge=1, le=10_000), follow: bool = False):
        """The last ``count`` events; with ``follow=true`` a server-sent event stream that stays open."""
        if follow:
            return StreamingResponse(control.follow(count), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return EventList(events=await control.events(count))

    @v1.post("/workers/{worker_id}/drain", response_model=ActionResult, tags=["act"])
    async def drain(worker_id: str, timeout: float = Query(60.0, gt=0, le=3600), force: bool = False) -> ActionResult:
        """Out of rotation, then wait (up to ``timeout`` s) until its in-flight requests have finished. The last
        worker of a role in rotation is refused (409) unless ``force=true``."""
        return await control.drain(worker_id, timeout, force)

    @v1.post("/workers/{worker_id}/restart", response_model=ActionResult, tags=["act"])
    async def restart(worker_id: str, timeout: float = Query(120.0, gt=0, le=3600)) -> ActionResult:
        """Restart the engine process (outside its restart budget); wait until it is ready and routed again."""
        return await control.restart(worker_id, timeout)

    @v1.put("/workers/{worker_id}/rotation", response_model=ActionResult, tags=["act"])
    async def rotation(worker_id: str, change: RotationChange, force: bool = False) -> ActionResult:
        """Take a worker out of the router's rotation (false) or put it back (true); the last worker of a role
        in rotation stays in (409) unless ``force=true``."""
        return await control.rotation(worker_id, change.rotation, force=force)

    @v1.put("/groups/{group}/policy", response_model=ActionResult, tags=["act"])
    async def policy(group: str, change: PolicyChange) -> ActionResult:
        """Switch a group's routing policy; new requests use it, requests in flight are not moved."""
        return await control.set_policy(group, change.policy)

    app.include_router(v1)
    return app
