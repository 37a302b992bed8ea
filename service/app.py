"""The HTTP API: `create_app(settings)` builds the FastAPI app (uvicorn latprune.service.app:app
--factory ... or `create_app()` in code).

Routes live in service/routes (one module per resource), bodies in service/schemas.py. Every
/v1 route needs `Authorization: Bearer <token>`; every error is JSON
`{"error": {"status": N, "message": "...", "details": [...]?}}`.
"""
from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latprune.service import worker
from latprune.service.auth import RateLimiter
from latprune.service.db import engine_for
from latprune.service.metrics import Metrics, MetricsMiddleware
from latprune.service.routes import calibration, devices, health, jobs, models, tables
from latprune.service.settings import Settings, get_settings
from latprune.service.storage import Storage

log = logging.getLogger("latprune.service.api")

API_VERSION = "1"

# Routes that stream their body under their own, larger limits (uploads).
_STREAMED = (re.compile(r"^/v1/models/?$"), re.compile(r"^/v1/calibration/?$"),
             re.compile(r"^/v1/devices/[^/]+/tables/?$"))


def error_body(status: int, message: str, details: list[Any] | None = None) -> dict:
    error: dict[str, Any] = {"status": status, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


class BodyTooLarge(HTTPException):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit_bytes // 1024} KiB")


class BodyLimitMiddleware:
    """Pure ASGI: refuses request bodies over `limit_bytes` (413 JSON), counting bytes as they
    arrive, so chunked bodies without Content-Length are limited too. Upload routes, which
    stream under their own limits, are exempt."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit = limit_bytes

    @staticmethod
    def exempt(scope: Scope) -> bool:
        return scope.get("method") == "POST" and any(p.match(scope.get("path", "")) for p in _STREAMED)

    async def _reject(self, send: Send, status: int, message: str) -> None:
        response = JSONResponse(error_body(status, message), status_code=status, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                if not value.isdigit() or len(value) > 20:
                    await self._reject(send, 400, "invalid Content-Length header")
                    return
                if int(value) > self.limit:
                    await self._reject(send, 413, BodyTooLarge(self.limit).detail)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where the app does not turn it into a response
            if started:
                raise
            await self._reject(send, 413, exc.detail)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _validation_details(exc: RequestValidationError) -> list[dict]:
    details = []
    for err in exc.errors()[:50]:
        details.append({"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))[:500],
                        "type": str(err.get("type", ""))})
    return details


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path` (Starlette's 405 names the first route's only)."""
    table = getattr(app.state, "path_methods", None)
    if table is None:
        table = []
        for template, ops in app.openapi().get("paths", {}).items():
            pattern = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")
            methods = {m.upper() for m in ops}
            if "GET" in methods:
                methods.add("HEAD")
            table.append((pattern, methods))
        app.state.path_methods = table
    found: set[str] = set()
    for pattern, methods in table:
        if pattern.match(path):
            found |= methods
    return sorted(found)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        details = getattr(exc, "details", None)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request.app, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return JSONResponse(error_body(exc.status_code, message, details), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "request"
        message = f"invalid request: {where}: {first['msg']}"
        return JSONResponse(jsonable_encoder(error_body(422, message, details)), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app. Its lifespan creates the data dir and database tables and, with the in-process
    executor, registers this machine's CPU as `local_device` and runs the worker pool."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        app.state.storage = Storage(settings.data_path)
        app.state.storage.sweep_tmp()
        engine_for(settings.db_url)
        pool = None
        if settings.executor == "inprocess":
            # With Celery, local_device names a farm device that its agent registers.
            await run_in_threadpool(worker.register_local_device, settings)
            pool = worker.WorkerPool(settings)
            pool.start()
        app.state.pool = pool
        log.info("latprune API ready: data %s, executor %s", settings.data_path, settings.executor)
        try:
            yield
        finally:
            if pool is not None:
                await run_in_threadpool(pool.stop)
            app.state.pool = None

    app = FastAPI(
        title="latprune",
        version=API_VERSION,
        summary="Latency-budgeted pruning of ONNX CNNs, measured on the target device.",
        description="Upload a model, submit an optimize job with a latency budget for a device, "
                    "download the pruned model and its report. Every /v1 route needs "
                    "`Authorization: Bearer <token>`.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.storage = None
    app.state.pool = None
    app.state.rate_limiter = RateLimiter(settings.jobs_per_minute)
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for module in (models, calibration, devices, tables, jobs, health):
        app.include_router(module.router)
    # Added last = outermost: metrics see every answer, the body limit's 413s included.
    app.add_middleware(BodyLimitMiddleware, limit_bytes=settings.max_body_kb * 1024)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
