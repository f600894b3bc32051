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

from fastapi import FastAPI, Query, status
from pydantic import BaseModel

# The given problems.py, beside this file in the image's WORKDIR: uvicorn imports `app` as a
# top-level module there, so the import is by plain name (the Dockerfile copies both files).
from problems import ProblemError, install_problem_details, problem_responses

logger = logging.getLogger("deploy-demo")

# The problem type of /ready's 503, the same in every service of this course.
NOT_READY = "https://course.example/problems/not-ready"


class Readiness:
    """Whether this process should receive traffic. One per app, flipped by the lifespan."""

    def __init__(self) -> None:
        self.ready = False


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"


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


app = FastAPI(title="Deploy demo", version="1.0.0", lifespan=lifespan, responses=problem_responses(422))
install_problem_details(app)  # every error is a problem: the 404 of an unknown path, a 405, a 422, a 500
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
    responses=problem_responses(status.HTTP_503_SERVICE_UNAVAILABLE),
)
async def ready() -> Ready:
    if not app.state.readiness.ready:
        # A probe reads only the status code; the problem says the same to a person.
        raise ProblemError(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "The service is starting up or shutting down.",
            type=NOT_READY,
            title="Not ready",
        )
    return Ready()


@app.get("/slow", tags=["demo"], summary="A request that takes a while (to watch a graceful shutdown)")
async def slow(seconds: Annotated[float, Query(ge=0, le=10)] = 0.5) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
