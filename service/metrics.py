"""Prometheus metrics of one API app, in a registry of its own (several apps in one process,
as in the tests, never clash).

- latprune_http_requests_total{method, route, status}: route is the route's template
  ("/v1/jobs/{job_id}"), "unmatched" for paths no route serves, so ids never become labels.
- latprune_http_request_duration_seconds{method, route}: latency histogram.
- latprune_jobs{state}: jobs per state, filled from the database at scrape time.
- latprune_upload_bytes_total{kind}: bytes of accepted uploads (model, calibration, table).
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("latprune_http_requests", "HTTP requests by method, route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("latprune_http_request_duration_seconds", "HTTP request latency, seconds",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.jobs = Gauge("latprune_jobs", "Jobs by state (read from the database at scrape time)",
                          ["state"], registry=self.registry)
        self.upload_bytes = Counter("latprune_upload_bytes", "Bytes of accepted uploads by kind",
                                    ["kind"], registry=self.registry)

    def set_job_counts(self, counts: dict[str, int], states: tuple[str, ...]) -> None:
        for state in states:
            self.jobs.labels(state=state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request once it has answered (or raised: counted as 500)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "GET")
            method = method if method in KNOWN_METHODS else "OTHER"
            route = route_template(scope)
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - t0)
