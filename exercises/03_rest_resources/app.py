"""Exercise 03: a versioned REST resource.

Read README.md in this folder for the full task. Run `pytest exercises/03_rest_resources`
(or `grader check 03`) to see what is still missing.
"""

from dataclasses import dataclass, field
from http import HTTPStatus  # noqa: F401
from typing import Annotated, Any  # noqa: F401

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, status  # noqa: F401 (you will need them)
from fastapi.encoders import jsonable_encoder  # noqa: F401
from fastapi.exceptions import RequestValidationError  # noqa: F401
from fastapi.responses import JSONResponse  # noqa: F401
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: F401
from starlette.routing import Match  # noqa: F401

# --- Models (ready to use) ---------------------------------------------------------------


class ItemIn(BaseModel):
    """What a client sends to create or replace an item."""

    name: str = Field(min_length=1, max_length=100)
    # TODO: a price is finite and at most 1_000_000 (README): 1e309 must not become infinity.
    price: float = Field(gt=0)


class Item(BaseModel):
    """What the API answers: the item with the id the server chose."""

    id: int
    name: str
    price: float


# Every error is a problem (RFC 9457), served as application/problem+json (README, "Errors").
PROBLEM_JSON = "application/problem+json"
ABOUT_BLANK = "about:blank"
PROBLEMS = "https://course.example/problems/"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The body of every error response: use it in `responses=` so the OpenAPI schema says so."""

    model_config = ConfigDict(extra="allow")

    type: str = ABOUT_BLANK
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None


# TODO: the v2 list envelope: items, total, limit, offset, next (a path or None).
# TODO: bounded ids and offsets: 1 <= item_id <= 2147483647 (Path(...)), offset <= 2147483647.


# --- Errors --------------------------------------------------------------------------------


class APIError(Exception):
    """Base class of the API's own errors. Each subclass sets its status code, type and title."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    type = ABOUT_BLANK
    title = "Internal Server Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# TODO: class ItemNotFound(APIError): 404, type PROBLEMS + "item-not-found", title "Item not found",
#       a detail that names the id ("No item has the id 7.").
# TODO: class DuplicateItem(APIError): 409, type PROBLEMS + "duplicate-name", title "Name taken".
# TODO: problem(request, status_code, detail, ...) -> JSONResponse: the five members, instance =
#       request.url.path, media_type=PROBLEM_JSON.
# TODO: exception handlers that answer a problem for APIError, for RequestValidationError (422,
#       with "errors": loc, msg and type of each, never input or ctx), for Starlette's
#       HTTPException (a 405 with an Allow header naming every method of the path) and for
#       Exception (500). Register them in create_app().


# --- Storage -------------------------------------------------------------------------------


@dataclass
class ItemStore:
    """In-memory items. create_app() makes one per application."""

    items: dict[int, Item] = field(default_factory=dict)
    next_id: int = 1

    # TODO: add(data) -> Item            (409 on a duplicate name, ignoring case)
    # TODO: get(item_id) -> Item         (404 when missing)
    # TODO: replace(item_id, data) -> Item
    # TODO: delete(item_id) -> None
    # TODO: page(offset, limit) -> (items ordered by id, total)


async def get_store(request: Request) -> ItemStore:
    """The store of the application that is serving this request."""
    return request.app.state.store


StoreDep = Annotated[ItemStore, Depends(get_store)]


# --- Routes --------------------------------------------------------------------------------

# TODO: tags=["items v1"]; the routes of the README's v1 table, each with its summary.
v1 = APIRouter(prefix="/api/v1")

# TODO: tags=["items v2"]; the same routes, but POST's Location is under /api/v2 and the list
#       answers the page envelope.
v2 = APIRouter(prefix="/api/v2")


def create_app() -> FastAPI:
    """A new application with its own, empty store."""
    app = FastAPI(title="Catalogue", version="2.0.0")
    app.state.store = ItemStore()
    # TODO: register the exception handlers.
    app.include_router(v1)
    app.include_router(v2)
    return app


app = create_app()
