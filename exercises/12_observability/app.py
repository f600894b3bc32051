"""Exercise 12: make the inventory service observable.

Read README.md in this folder for the full task. Run `pytest exercises/12_observability`
(or `grader check 12`) to see what is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, status
from opentelemetry import trace
from pydantic_settings import BaseSettings

# Given (the same file in every exercise from 04 on): every error is a problem (RFC 9457).
from .problems import ProblemError, install_problem_details, problem_responses

# ----------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    """TODO: read OBS_* environment variables and a .env file (SettingsConfigDict).

    Fields: app_name (str, "inventory"), environment ("dev" | "staging" | "prod", "dev"),
    database_url (str, "sqlite+aiosqlite:///./inventory.db"), log_level ("DEBUG" | "INFO" |
    "WARNING" | "ERROR", "INFO"), ready_timeout (float > 0, 2.0), warehouse_url (str,
    "http://127.0.0.1:8001"), warehouse_timeout (float > 0, 5.0), warehouse_max_bytes (int from 1
    to 16_777_216, 65_536) and secret_key: a SecretStr with NO default.
    """

    app_name: str = "inventory"


def get_settings() -> Settings:
    # TODO: one Settings object per process (functools.lru_cache), so cache_clear() exists.
    return Settings()


# ----------------------------------------------------------------------------- logging

ACCESS_LOGGER_NAME = "inventory.access"
access_log = logging.getLogger(ACCESS_LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """TODO: one line of JSON per record.

    Keys: timestamp (ISO 8601 with a time zone), level, logger, message, every field
    passed with `extra={...}`, and trace_id / span_id of the span current while the line is
    written (see "Traces" in the README).
    """


# ----------------------------------------------------------------------------- the app

ITEMS: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "keyboard"},
    2: {"id": 2, "name": "mouse"},
    3: {"id": 3, "name": "monitor"},
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # TODO: read the settings here (a bad value must stop the start), configure logging at
    #       settings.log_level, create the async engine for settings.database_url, and
    #       dispose of it on the way out.
    yield


def create_app(
    tracer_provider: trace.TracerProvider | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    app = FastAPI(title="Inventory", version="1.1.0", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)  # given: errors are problems; keep it

    # TODO: a tracer from tracer_provider (or a TracerProvider of the app's own, never the
    #       global one); the middleware continues an incoming traceparent with a SERVER span
    #       named "GET /items/{item_id}" and puts trace_id / span_id in the access line. A
    #       request ID you make up is the trace ID.

    # TODO: a CollectorRegistry for this app, a Counter http_requests_total
    #       (method, route, status) and a Histogram http_request_duration_seconds
    #       (method, route), fed by a middleware that also logs one line per request on
    #       "inventory.access" and sets the X-Request-ID response header.

    @app.get("/health")
    async def health() -> dict[str, str]:
        # TODO: {"status": "ok"}, checking nothing outside the process.
        return {}

    # TODO: GET /ready -> 200 {"status": "ready", "checks": {"database": "ok"}} after
    #       SELECT 1 succeeds; else the 503 problem of the README:
    #       raise ProblemError(503, "...", type="https://course.example/problems/not-ready",
    #                          title="Not ready", checks={"database": "down"})

    # TODO: GET /info -> {"app_name": ..., "environment": ...} from Depends(get_settings).

    @app.get("/items/{item_id}", responses=problem_responses(status.HTTP_404_NOT_FOUND))
    async def read_item(item_id: int) -> dict[str, Any]:
        item = ITEMS.get(item_id)
        if item is None:
            raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"No item has the id {item_id}.")
        return item

    # TODO: GET /items/{item_id}/stock -> 404 for an unknown item; else ask the warehouse
    #       GET {warehouse_url}/stock/{item_id} through an httpx.AsyncClient (transport=transport)
    #       whose requests carry the current traceparent; a 502 problem when it fails or has not
    #       answered completely within settings.warehouse_timeout (asyncio.timeout around the call)
    #       (raise HTTPException(502, "...")), declared with responses=problem_responses(404, 502).
    # TODO: read the warehouse's answer as it streams in (client.stream, aiter_bytes) and no further
    #       than one byte past settings.warehouse_max_bytes: longer is a 502 too, logged as such.

    # TODO: GET /metrics -> generate_latest(registry) with media_type CONTENT_TYPE_LATEST.

    return app


app = create_app()
