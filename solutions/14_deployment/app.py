"""Lesson 14 reference: a service that tells its platform when it is alive and when it is ready.

The container engine, Compose and Kubernetes all ask the same two questions:
- "is the process alive?"      -> GET /health, answered by the process alone;
- "may I send it traffic now?" -> GET /ready, true only between startup and shutdown.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Response, status
from pydantic import BaseModel

logger = logging.getLogger("deploy-demo")


class Readiness:
    """Whether this process should receive traffic. One per app, flipped by the lifespan."""

    def __init__(self) -> None:
        self.ready = False


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready", "not ready"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Startup: open pools, warm caches, run checks... then, and only then, accept traffic.
    app.state.readiness.ready = True
    logger.info("startup complete: ready for traffic")
    try:
        yield
    finally:
        # Uvicorn reaches this point after SIGTERM, once its socket is closed and in-flight
        # requests have finished (or --timeout-graceful-shutdown ran out): no probe can see the
        # flag any more (the preStop sleep in k8s.yaml is what drains traffic), but anything that
        # still holds the app in-process gets the truth. Then release resources: pools, buffers.
        app.state.readiness.ready = False
        logger.info("shutdown: drained, resources released")


app = FastAPI(title="Deploy demo", version="1.0.0", lifespan=lifespan)
# Set at import, so /ready can answer 503 even when the lifespan has not run (yet).
app.state.readiness = Readiness()


@app.get("/health", tags=["ops"], summary="Liveness: the process is up")
async def health() -> Health:
    # No database, no cache, no upstream: if this fails, restarting the container helps.
    return Health()


@app.get(
    "/ready",
    tags=["ops"],
    summary="Readiness: send traffic here",
    responses={503: {"model": Ready, "description": "Starting up or shutting down"}},
)
async def ready(response: Response) -> Ready:
    if not app.state.readiness.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Ready(status="not ready")
    return Ready(status="ready")


@app.get("/slow", tags=["demo"], summary="A request that takes a while (to watch a graceful shutdown)")
async def slow(seconds: Annotated[float, Query(ge=0, le=10)] = 0.5) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
