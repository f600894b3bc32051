"""Exercise 14: a service ready to be deployed.

Read README.md in this folder for the whole task. The orchestrator (Docker, Compose,
Kubernetes) asks this app two questions: "are you alive?" (/health) and "may I send you
traffic?" (/ready). Make the answers honest.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query

# The given problems.py (do not edit it): every error of the app is a problem (RFC 9457).
# uvicorn imports app.py as a top-level module, so problems.py is imported by its plain name,
# and the image needs both files.
from problems import ProblemError, install_problem_details, problem_responses

# The problem type of /ready's 503 (README, Promises).
NOT_READY = "https://course.example/problems/not-ready"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # TODO: the app becomes ready here, once startup is done...
    yield
    # TODO: ...and stops being ready as soon as the shutdown begins.


app = FastAPI(title="Deploy demo", version="1.0.0", lifespan=lifespan, responses=problem_responses(422))
# TODO: make every error a problem: install_problem_details(app), from the given problems.py.


@app.get("/health")
async def health() -> dict[str, str]:
    # TODO: answer {"status": "ok"} whenever the process is up, even before startup finished.
    return {}


@app.get("/ready")  # TODO: declare its 503 problem: responses=problem_responses(503)
async def ready() -> dict[str, str]:
    # TODO: 200 {"status": "ready"} between startup and shutdown; before startup and once
    #       shutdown has begun, a 503 problem:
    #       raise ProblemError(503, "The service is starting up or shutting down.",
    #                          type=NOT_READY, title="Not ready")
    return {"status": "ready"}


@app.get("/slow")
async def slow(seconds: Annotated[float, Query()] = 0.5) -> dict[str, float]:
    # TODO: bound `seconds` between 0 and 10 (422 outside).
    await asyncio.sleep(seconds)
    return {"slept": seconds}
