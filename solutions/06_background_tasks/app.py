"""Lesson 06 reference: a signup that answers at once and sends the welcome message afterwards.

The welcome message is written to an outbox folder (one JSON file per message) by a
background task, after the response has gone out. The lifespan prepares the outbox and the
application state at startup and reports what was delivered at shutdown.

    cd solutions && OUTBOX_DIR=/tmp/outbox uvicorn --factory 06_background_tasks.app:create_app
"""

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, status
from pydantic import BaseModel, EmailStr, Field
from starlette.concurrency import run_in_threadpool

from .problems import install_problem_details, problem_responses

logger = logging.getLogger("signup")


class SignupIn(BaseModel):
    email: EmailStr
    name: str = Field(min_length=1, max_length=100)


class Signup(SignupIn):
    id: int


@dataclass
class ServiceState:
    """Everything the app keeps between requests. Built by the lifespan, one per app."""

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
    """Blocking file I/O, run in a worker thread."""
    target = outbox / f"{message_id}.json"
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(message), encoding="utf-8")
    os.replace(partial, target)  # atomic: a reader never sees half a message


async def send_welcome(state: ServiceState, user: Signup) -> None:
    """Write the welcome message to the outbox, after the response has been sent.

    Nobody is left to tell about a failure at this point, so the task logs it (with the
    traceback) and counts it. Letting the exception escape would only reach the server's
    generic error log and skip any task queued after this one.
    """
    message = {"to": user.email, "subject": f"Welcome, {user.name}!", "body": "Thanks for signing up."}
    try:
        # Only the blocking write goes to a thread; the state is updated here, on the event
        # loop, so concurrent tasks never race on the counters.
        await run_in_threadpool(write_message, state.outbox, user.id, message)
    except Exception:
        state.failed += 1
        state.events.append(f"welcome failed for {user.email}")
        # The user's id, not the address: an e-mail address is personal data, and logs travel far.
        logger.exception("welcome message for user %s could not be written to %s", user.id, state.outbox)
        return
    state.sent += 1
    state.events.append(f"welcome sent to {user.email}")


def audit(request: Request, tasks: BackgroundTasks, state: State) -> None:
    """Record the request after the response. `tasks` is the same object the route receives."""
    tasks.add_task(record_event, state, f"{request.method} {request.url.path}")


def create_app(outbox_dir: Path | str | None = None) -> FastAPI:
    """Build the service. Nothing touches the disk until the lifespan starts."""
    outbox = Path(outbox_dir or os.environ.get("OUTBOX_DIR", "outbox"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Startup: everything the app needs exists before the first request is accepted.
        outbox.mkdir(parents=True, exist_ok=True)
        state = ServiceState(outbox=outbox)
        app.state.service = state
        logger.info("outbox ready at %s", outbox)
        yield
        # Shutdown: runs after the last request (and its background tasks) has finished.
        logger.info("shutdown: %d welcome messages sent, %d failed", state.sent, state.failed)

    # Every error is a problem (RFC 9457, lesson 03): a 409 of ours, FastAPI's 422 (a body that
    # is not JSON included) and 400 (bytes that are not UTF-8), an unknown route's 404. The 422
    # never echoes the refused input.
    app = FastAPI(title="Signup service", version="0.6.0", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)

    @app.post(
        "/signup",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(audit)],
        summary="Sign up; the welcome message follows the response",
        responses=problem_responses(400, 409),  # 400: FastAPI's answer to a body whose bytes are not UTF-8
    )
    async def signup(data: SignupIn, tasks: BackgroundTasks, state: State) -> Signup:
        if data.email in state.users:
            # Raising discards the background tasks already added: no audit entry, no welcome.
            raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="Email already registered")
        user = Signup(id=len(state.users) + 1, **data.model_dump())
        state.users[user.email] = user
        # Runs after the response; send_welcome logs its own failures, so the client never waits
        # for the outbox and never sees its errors.
        tasks.add_task(send_welcome, state, user)
        return user

    @app.get("/events", summary="The events recorded so far, oldest first")
    async def events(state: State) -> list[str]:
        return state.events

    return app

