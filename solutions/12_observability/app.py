"""Lesson 12 reference: settings from the environment, health probes, JSON access logs, metrics, traces."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from functools import lru_cache
from typing import Annotated, Any, Literal

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import (
    Problem,
    ProblemError,
    install_problem_details,
    problem_responses,
    unexpected_problem,
)

# --------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    """Every value comes from OBS_* environment variables or a .env file, checked by type."""

    model_config = SettingsConfigDict(
        env_prefix="OBS_",
        env_file=".env",
        env_file_encoding="utf-8",
        # A shared .env often holds other tools' variables too; they are not our business.
        extra="ignore",
    )

    app_name: str = "inventory"
    environment: Literal["dev", "staging", "prod"] = "dev"
    database_url: str = "sqlite+aiosqlite:///./inventory.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ready_timeout: float = Field(default=2.0, gt=0)
    # The warehouse service that knows the stock (GET /items/{item_id}/stock asks it).
    warehouse_url: str = "http://127.0.0.1:8001"
    # One deadline for the whole call to it, every read of its answer included.
    warehouse_timeout: float = Field(default=5.0, gt=0)
    # The most of its answer's body read (as decoded): a stock is a few dozen bytes, and a
    # warehouse that sends gigabytes costs this much, not them (lesson 10).
    warehouse_max_bytes: int = Field(default=65_536, ge=1, le=16_777_216)
    # No default on purpose: a service that starts without its secret fails later, and worse.
    secret_key: SecretStr


@lru_cache
def get_settings() -> Settings:
    """The one Settings object of the process; tests override it or call cache_clear()."""
    # Fields come from the environment and .env; a missing or malformed one raises ValidationError.
    return Settings()


SettingsDep = Annotated[Settings, Depends(get_settings)]

# --------------------------------------------------------------------------- logging

LOGGER_NAME = "inventory"
ACCESS_LOGGER_NAME = "inventory.access"
log = logging.getLogger(LOGGER_NAME)
access_log = logging.getLogger(ACCESS_LOGGER_NAME)

# The request being served, so that any log line written during it can carry its ID.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record as one line of JSON: the standard fields plus everything from `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES)
        # A record formatted while a span is current belongs to that span's trace. Formatting
        # runs in the thread (and context) that logged, so the current span is the right one.
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry.setdefault("trace_id", format_trace_id(context.trace_id))
            entry.setdefault("span_id", format_span_id(context.span_id))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes newlines, so a multi-line message still makes exactly one line.
        return json.dumps(entry, default=str)


class RequestIdFilter(logging.Filter):
    """Copy the current request's ID into every record, so lines written in a route carry it too."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def configure_logging(level: str) -> None:
    """Send the service's logs to stdout as JSON lines; idempotent, so reloads add no duplicates."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    # The platform (Docker, Kubernetes) collects stdout; the root logger's handlers would print twice.
    log.propagate = False


# --------------------------------------------------------------------------- metrics


class HttpMetrics:
    """The RED metrics of an HTTP service: rate and errors (a counter), duration (a histogram)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            registry=registry,
        )

    def observe(self, method: str, route: str, status_code: int, seconds: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status_code)).inc()
        self.duration.labels(method=method, route=route).observe(seconds)


# --------------------------------------------------------------------------- tracing

# W3C Trace Context, named explicitly: the global propagator can be changed by OTEL_PROPAGATORS,
# and this service promises `traceparent`.
PROPAGATOR = TraceContextTextMapPropagator()


def incoming_headers(scope: Scope) -> dict[str, str]:
    """The request's `traceparent` as a carrier for the propagator, and nothing else. Not its
    `tracestate` (vendors' data this service keeps none of): OpenTelemetry logs a malformed one
    whole, so a stranger's kilobytes, newlines included, would reach the log on every request."""
    for name, value in scope["headers"]:  # ASGI names are lower case already
        if name == b"traceparent":
            return {"traceparent": value.decode("latin-1")}
    return {}


def default_tracer_provider() -> TracerProvider:
    """Spans with real IDs and nowhere to go: a deployment adds an exporter (see the lesson)."""
    return TracerProvider(resource=Resource.create({"service.name": "inventory"}))


# --------------------------------------------------------------------------- middleware

REQUEST_ID_HEADER = "X-Request-ID"
# Reuse a caller's ID only when it is short and plain: it ends up in every log line.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _VALID_REQUEST_ID.fullmatch(candidate) else None
    return None


def route_template(scope: Scope) -> str:
    """The matched route's template ('/items/{item_id}'), never the raw path: labels must stay few."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class ObservabilityMiddleware:
    """Pure ASGI middleware: a request ID, one access-log line and the metrics for every request.

    Written as plain ASGI rather than with @app.middleware("http") so that it adds no extra
    task per request and never buffers a streaming response.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, tracer: trace.Tracer) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # Continue the caller's trace when its traceparent is valid; a missing or malformed one
        # extracts to an empty context, and the span below starts a new trace (never an error).
        parent = PROPAGATOR.extract(incoming_headers(scope))
        # The name is the method until routing has run; then the route template (never the raw
        # path: span names are grouped on, and ids in them make one group per item).
        with self.tracer.start_as_current_span(
            scope["method"], context=parent, kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False
        ) as span:
            context = span.get_span_context()
            trace_id, span_id = format_trace_id(context.trace_id), format_span_id(context.span_id)
            # One rule: a caller's plain ID is kept; otherwise the request ID is the trace ID.
            request_id = _incoming_request_id(scope) or trace_id
            token = request_id_var.set(request_id)
            status_code = 500  # what the client gets if the app raises before it answers
            started = time.perf_counter()

            started_response = False

            async def send_with_request_id(message: Message) -> None:
                nonlocal status_code, started_response
                if message["type"] == "http.response.start":
                    status_code, started_response = message["status"], True
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
                await send(message)

            try:
                await self.app(scope, receive, send_with_request_id)
            except Exception as exc:
                span.record_exception(exc)
                if not started_response:
                    # Answer the 500 problem here, through send_with_request_id, so that it carries
                    # the request ID too (Starlette's outermost ServerErrorMiddleware would send it
                    # without). Then re-raise: the server logs the traceback, the client never sees it.
                    response = await unexpected_problem(Request(scope), exc)
                    await response(scope, receive, send_with_request_id)
                raise
            finally:
                seconds = time.perf_counter() - started
                # Routing has run by now, so the scope knows which route (if any) matched.
                route = route_template(scope)
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.request.method", scope["method"])
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status_code)
                if status_code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.metrics.observe(scope["method"], route, status_code, seconds)
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "trace_id": trace_id,
                        "span_id": span_id,
                        "method": scope["method"],
                        "route": route,
                        "status": status_code,
                        "duration_ms": round(seconds * 1000, 3),
                    },
                )
                request_id_var.reset(token)


# --------------------------------------------------------------------------- the app

class Stock(BaseModel):
    """How many of an item the warehouse holds."""

    item_id: int
    quantity: int = Field(ge=0)


class AnswerTooLarge(ValueError):
    """The warehouse's answer went past settings.warehouse_max_bytes."""


async def read_at_most(answer: httpx.Response, limit: int) -> bytes:
    """A streamed answer's body, read no further than one byte past `limit` (then AnswerTooLarge):
    the rest is never read, and closing the answer drops it with the connection."""
    body = bytearray()
    async for chunk in answer.aiter_bytes():  # decoded: a small gzip counts for what it inflates to
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(f"the answer is longer than warehouse_max_bytes ({limit} bytes)")
    return bytes(body)


class Readiness(BaseModel):
    """What /ready answers when every dependency answers."""

    status: Literal["ready"]
    checks: dict[str, Literal["ok"]]


class NotReady(Problem):
    """The 503 problem of /ready: which dependency is down, for whoever reads more than the code."""

    checks: dict[str, Literal["ok", "down"]]


NOT_READY = "https://course.example/problems/not-ready"


ITEMS: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "keyboard"},
    2: {"id": 2, "name": "mouse"},
    3: {"id": 3, "name": "monitor"},
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Reading the settings here validates every value before the first request is accepted:
    # a missing secret or a malformed number stops the start, with a message naming the field.
    settings = get_settings()
    configure_logging(settings.log_level)
    # create_async_engine does not connect yet, so a database that is down does not stop the
    # process: it stays alive (liveness) and reports itself not ready (readiness) instead.
    app.state.engine = create_async_engine(settings.database_url)
    # One client for the app's life: its connections are reused. Every request it sends carries
    # the current trace context (inject_trace_context below).
    app.state.warehouse = httpx.AsyncClient(
        base_url=settings.warehouse_url,
        transport=app.state.warehouse_transport,
        # Bounds each phase (connecting, each read): a dead connection fails within one. It is no
        # deadline: a warehouse that sends a byte now and then never keeps one read waiting.
        timeout=httpx.Timeout(settings.warehouse_timeout),
        event_hooks={"request": [inject_trace_context]},
    )
    log.info("started", extra={"app_name": settings.app_name, "environment": settings.environment})
    try:
        yield
    finally:
        await app.state.warehouse.aclose()
        await app.state.engine.dispose()


async def inject_trace_context(request: httpx.Request) -> None:
    """Write the current span's traceparent into an outgoing request, so the trace continues."""
    PROPAGATOR.inject(request.headers)


def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


def create_app(
    tracer_provider: trace.TracerProvider | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """A new app. Tests hand in a tracer provider (with an in-memory exporter) and the transport
    the warehouse client sends through; nothing here touches OpenTelemetry's global provider."""
    # Every route's path parameters and bodies may be refused with a 422 problem.
    app = FastAPI(title="Inventory", version="1.3.0", lifespan=lifespan, responses=problem_responses(422))
    # Every error is a problem (RFC 9457): the given problems.py, the same in every service.
    install_problem_details(app)
    tracer = (tracer_provider or default_tracer_provider()).get_tracer("inventory")
    app.state.warehouse_transport = transport

    # One registry per app. The module-level default REGISTRY is shared by the whole process:
    # building a second app (a test, a reload) would register the same metric names twice
    # and fail with "Duplicated timeseries in CollectorRegistry".
    registry = CollectorRegistry()
    app.add_middleware(ObservabilityMiddleware, metrics=HttpMetrics(registry), tracer=tracer)

    @app.get("/health", tags=["ops"], summary="Liveness: the process is up")
    async def health() -> dict[str, str]:
        # Deliberately checks nothing outside the process: a database outage must not make
        # the orchestrator restart healthy replicas in a loop.
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["ops"],
        summary="Readiness: the dependencies answer",
        responses={
            status.HTTP_200_OK: {"model": Readiness},
            status.HTTP_503_SERVICE_UNAVAILABLE: {
                "model": NotReady,
                "description": "A dependency cannot be reached",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/NotReady"}}},
            },
        },
    )
    async def ready(engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
        try:
            async with asyncio.timeout(settings.ready_timeout):
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("database not ready", extra={"error": f"{type(exc).__name__}: {exc}"})
            # A probe reads only the code; the problem says which check failed, never why (the
            # exception's text names hosts and users: it goes to the log above).
            raise ProblemError(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "A dependency of the service cannot be reached.",
                type=NOT_READY,
                title="Not ready",
                checks={"database": "down"},
            ) from None
        return {"status": "ready", "checks": {"database": "ok"}}

    @app.get("/info", tags=["ops"], summary="Public configuration")
    async def info(settings: SettingsDep) -> dict[str, str]:
        # Only what is safe to show: never the secret, never the database URL (it holds a password).
        return {"app_name": settings.app_name, "environment": settings.environment}

    @app.get(
        "/items/{item_id}",
        tags=["items"],
        summary="Read one item",
        responses=problem_responses(status.HTTP_404_NOT_FOUND),
    )
    async def read_item(item_id: int) -> dict[str, Any]:
        item = ITEMS.get(item_id)
        if item is None:
            raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"No item has the id {item_id}.")
        return item

    @app.get(
        "/items/{item_id}/stock",
        tags=["items"],
        summary="How many the warehouse holds",
        responses=problem_responses(status.HTTP_404_NOT_FOUND, status.HTTP_502_BAD_GATEWAY),
    )
    async def read_stock(item_id: int, request: Request, settings: SettingsDep) -> Stock:
        if item_id not in ITEMS:
            raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"No item has the id {item_id}.")
        client: httpx.AsyncClient = request.app.state.warehouse
        # A client span for the call: the warehouse's server span becomes its child.
        with tracer.start_as_current_span("GET /stock/{item_id}", kind=SpanKind.CLIENT) as span:
            try:
                # The deadline of the whole call (lesson 10): connecting, sending and reading the
                # answer, however slowly it trickles in; and a limit to how much of it is read.
                async with asyncio.timeout(settings.warehouse_timeout):
                    async with client.stream("GET", f"/stock/{item_id}") as answer:
                        span.set_attribute("http.response.status_code", answer.status_code)
                        answer.raise_for_status()  # before reading: an error's body is not worth it
                        body = await read_at_most(answer, settings.warehouse_max_bytes)
                # strict: a quantity of "7" or 7.5 is a warehouse bug, not something to guess about
                stock = Stock.model_validate_json(body, strict=True)
            except (httpx.HTTPError, ValueError, TimeoutError) as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.warning("warehouse failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                raise HTTPException(status_code=status.HTTP_502_BAD_GATEWAY, detail="The warehouse failed to answer.") from None
        if stock.item_id != item_id:
            log.warning("warehouse answered for another item", extra={"asked": item_id, "got": stock.item_id})
            raise HTTPException(status_code=status.HTTP_502_BAD_GATEWAY, detail="The warehouse failed to answer.")
        return stock

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# `uvicorn 12_observability.app:app` (from solutions/) serves this one; importing the module reads no settings yet.
app = create_app()
