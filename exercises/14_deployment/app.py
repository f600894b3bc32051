"""Exercise 14: a service ready to be deployed.

Read README.md in this folder for the whole task. The orchestrator (Docker, Compose,
Kubernetes) asks this app two questions: "are you alive?" (/health) and "may I send you
traffic?" (/ready). Make the answers honest.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query, Response


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # TODO: the app becomes ready here, once startup is done...
    yield
    # TODO: ...and stops being ready as soon as the shutdown begins.


app = FastAPI(title="Deploy demo", version="1.0.0", lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    # TODO: answer {"status": "ok"} whenever the process is up, even before startup finished.
    return {}


@app.get("/ready")
async def ready(response: Response) -> dict[str, str]:
    # TODO: 200 {"status": "ready"} between startup and shutdown,
    #       503 {"status": "not ready"} before startup and once shutdown has begun.
    return {"status": "ready"}


@app.get("/slow")
async def slow(seconds: Annotated[float, Query()] = 0.5) -> dict[str, float]:
    # TODO: bound `seconds` between 0 and 10 (422 outside).
    await asyncio.sleep(seconds)
    return {"slept": seconds}
