"""Exercise 06: a signup that answers at once and sends its welcome message afterwards.

Read README.md in this folder for the full task. Run `pytest exercises/06_background_tasks`
(or `grader check 06`) to see what is still missing.

    cd exercises && OUTBOX_DIR=/tmp/outbox uvicorn --factory 06_background_tasks.app:create_app
"""

import json
import logging
import os
from collections.abc import AsyncIterator  # noqa: F401
from contextlib import asynccontextmanager  # noqa: F401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, status
from pydantic import BaseModel, EmailStr, Field
from starlette.concurrency import run_in_threadpool  # runs blocking file I/O off the event loop

from .problems import install_problem_details, problem_responses  # given: every error is a problem (lesson 03)

logger = logging.getLogger("signup")


class SignupIn(BaseModel):
    email: EmailStr
    name: str = Field(min_length=1, max_length=100)


class Signup(SignupIn):
    id: int


@dataclass
class ServiceState:
    """Everything the app keeps between requests: one per app, made at startup."""

    outbox: Path
    users: dict[str, Signup] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    sent: int = 0
    failed: int = 0


def state_of(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(state_of)]


def record_event(state: ServiceState, event: str) -> None:
    state.events.append(event)


def write_message(outbox: Path, message_id: int, message: dict[str, str]) -> None:
    """Blocking file I/O: write outbox/<id>.json (through a temporary file, then an atomic rename)."""
    target = outbox / f"{message_id}.json"
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(message), encoding="utf-8")
    os.replace(partial, target)


async def send_welcome(state: ServiceState, user: Signup) -> None:
    """Write the welcome message {"to", "subject", "body"} to the outbox."""
    message = {"to": user.email, "subject": f"Welcome, {user.name}!", "body": "Thanks for signing up."}
    # TODO: this runs after the response: nobody is left to tell if it fails.
    #       Catch any exception, log it with logger.exception(...) (name the user's id, never the e-mail address),
    #       count it in state.failed and record the event "welcome failed for <email>".
    #       On success, count state.sent and record "welcome sent to <email>".
    await run_in_threadpool(write_message, state.outbox, user.id, message)


def audit(request: Request, state: State) -> None:
    """Record "<METHOD> <path>" in the events, after the response."""
    # TODO: add record_event as a background task, on the same BackgroundTasks as the route.
    tasks = BackgroundTasks()
    tasks.add_task(record_event, state, f"{request.method} {request.url.path}")


def create_app(outbox_dir: Path | str | None = None) -> FastAPI:
    """Build the service. Nothing may touch the disk until the app starts."""
    outbox = Path(outbox_dir or os.environ.get("OUTBOX_DIR", "outbox"))

    # TODO: a lifespan: at startup create the outbox folder (with its parents) and put a
    #       ServiceState on app.state.service; at shutdown log at INFO
    #       "shutdown: <sent> welcome messages sent, <failed> failed".
    app = FastAPI(title="Signup service", version="0.6.0", responses=problem_responses(422))
    install_problem_details(app)  # given, and done: every error answers application/problem+json
    outbox.mkdir(parents=True, exist_ok=True)
    app.state.service = ServiceState(outbox=outbox)

    # TODO: declare the errors this route answers besides the app's 422 (README "Errors"):
    #       responses=problem_responses(...) with the 409 and FastAPI's 400.
    @app.post("/signup", status_code=status.HTTP_201_CREATED, dependencies=[Depends(audit)])
    async def signup(data: SignupIn, state: State) -> Signup:
        if data.email in state.users:
            raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="Email already registered")
        user = Signup(id=len(state.users) + 1, **data.model_dump())
        state.users[user.email] = user
        # TODO: do not make the client wait: send the welcome in a background task.
        await send_welcome(state, user)
        return user

    @app.get("/events")
    async def events(state: State) -> list[str]:
        return state.events

    return app

