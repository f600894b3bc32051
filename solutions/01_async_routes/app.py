"""Lesson 01 reference: a first FastAPI service with typed path and query parameters."""

import asyncio
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, status
from pydantic import BaseModel

app = FastAPI(
    title="Hello Microservices",
    version="0.1.0",
    description="The first service of the course: typed parameters, status codes, async routes.",
)


class ErrorMessage(BaseModel):
    """The body FastAPI writes for an HTTPException: declared so the OpenAPI document shows it."""

    detail: str


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"model": ErrorMessage, "description": "No item has this id"},
}

# A tiny in-memory catalogue. Each test imports this module afresh, so it starts full.
ITEMS: dict[int, dict[str, str | int]] = {
    1: {"id": 1, "name": "keyboard"},
    2: {"id": 2, "name": "mouse"},
    3: {"id": 3, "name": "monitor"},
}


@app.get("/health", tags=["ops"], summary="Liveness check")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/greet/{name}", tags=["greetings"], summary="Greet someone by name")
async def greet(name: str, greeting: str = "Hello", shout: bool = False) -> dict[str, str]:
    message = f"{greeting}, {name}!"
    # `shout: bool` lets FastAPI parse "true", "1", "yes", "on" (and their opposites) for us.
    return {"message": message.upper() if shout else message}


@app.get("/add", tags=["math"], summary="Add two integers")
async def add(a: int, b: int) -> dict[str, int]:
    return {"result": a + b}


@app.get("/items/{item_id}", tags=["items"], summary="Read one item", responses=NOT_FOUND)
async def read_item(item_id: int) -> dict[str, str | int]:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"Item {item_id} not found")
    return item


@app.delete(
    "/items/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["items"],
    summary="Delete one item",
    responses=NOT_FOUND,
)
async def delete_item(item_id: int) -> None:
    if ITEMS.pop(item_id, None) is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"Item {item_id} not found")


@app.get("/wait", tags=["async"], summary="Wait without blocking the server")
async def wait(seconds: Annotated[float, Query(ge=0, le=2)] = 0.1) -> dict[str, float]:
    # asyncio.sleep hands the event loop back while waiting; time.sleep would freeze every request.
    await asyncio.sleep(seconds)
    return {"waited": seconds}
