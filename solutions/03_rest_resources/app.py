"""Lesson 03 reference: a versioned REST resource with honest status codes and one error shape."""

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

# ---------------------------------------------------------------------------------------
# Models: what a client sends, what it gets back, and what every error looks like.
# ---------------------------------------------------------------------------------------


# Ids (and so offsets: there are never more items than ids) fit a database's 32-bit INTEGER.
MAX_ID = 2**31 - 1
MAX_PRICE = 1_000_000


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    # allow_inf_nan=False: JSON's 1e309 (and Python's json's NaN/Infinity) parse to floats that
    # no JSON document can carry back, so the item would be answered with "price": null.
    price: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False)


class Item(BaseModel):
    id: int
    name: str
    price: float


class ItemPage(BaseModel):
    """The v2 list envelope: one page plus what a client needs to fetch the next one."""

    items: list[Item]
    total: int
    limit: int
    offset: int
    next: str | None


# Every error is a problem (RFC 9457): one shape that any client, gateway or log reader
# understands without knowing this service. `type` names the kind of problem: "about:blank"
# when the status says it all, else a URI of ours (never fetched: .example is reserved).
PROBLEM_JSON = "application/problem+json"
ABOUT_BLANK = "about:blank"
PROBLEMS = "https://course.example/problems/"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The body of every error response (for `responses=`, so the OpenAPI schema says so)."""

    model_config = ConfigDict(extra="allow")

    type: str = ABOUT_BLANK
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None


# ---------------------------------------------------------------------------------------
# Errors: the domain raises these; handlers turn them, and the framework's, into problems.
# ---------------------------------------------------------------------------------------


class APIError(Exception):
    """Base class: each subclass knows its status code, its problem type and its title."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    type = ABOUT_BLANK
    title = HTTPStatus.INTERNAL_SERVER_ERROR.phrase

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ItemNotFound(APIError):
    status_code = status.HTTP_404_NOT_FOUND
    type = PROBLEMS + "item-not-found"
    title = "Item not found"

    def __init__(self, item_id: int) -> None:
        super().__init__(f"No item has the id {item_id}.")


class DuplicateItem(APIError):
    status_code = status.HTTP_409_CONFLICT
    type = PROBLEMS + "duplicate-name"
    title = "Name taken"

    def __init__(self) -> None:
        # Not the name itself: a detail says what happened, it does not echo the request.
        super().__init__("Another item has this name (names are compared ignoring case).")


def problem(request: Request, status_code: int, detail: str, *, type: str = ABOUT_BLANK, title: str | None = None,
            headers: dict[str, str] | None = None, **members: Any) -> JSONResponse:
    body = {
        "type": type,
        "title": title or HTTPStatus(status_code).phrase,
        "status": status_code,
        "detail": detail,
        # The path only: a query string may carry what the client would not want in a log.
        "instance": request.url.path,
        **members,
    }
    return JSONResponse(body, status_code=status_code, headers=headers, media_type=PROBLEM_JSON)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return problem(request, exc.status_code, exc.detail, type=exc.type, title=exc.title)


def allowed_methods(request: Request) -> str:
    """Every method some route accepts at this path.

    The router's own 405 names only the methods of the first route whose path matched: with
    GET and POST /items on two routes, a PATCH would be told "Allow: POST", half the truth.
    """
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's HTTPException covers the framework's own 404 (no route), 405 (wrong method)
    # and 400 (a body that cannot be decoded); keeping its headers keeps what they carry.
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        headers["Allow"] = allowed_methods(request)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem(request, exc.status_code, detail, headers=headers)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    # Location, message and type only. Never the "input": it may be the infinity or NaN that
    # was refused, which JSON cannot carry (the 422 would become a 500), or a secret the client
    # should not see echoed. Nor "ctx", which may hold exception objects.
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
    return problem(request, status.HTTP_422_UNPROCESSABLE_CONTENT, "The request is not valid; see errors.", errors=errors)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug's 500 is a problem too. Starlette re-raises the exception after this answer, so
    # the server logs the traceback; the client learns nothing about the code.
    return problem(request, status.HTTP_500_INTERNAL_SERVER_ERROR, "The service failed to answer. The error is in its log.")


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries: these codes answer with a problem, as application/problem+json."""
    content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {code: {"model": Problem, "description": HTTPStatus(code).phrase, "content": content} for code in codes}


# ---------------------------------------------------------------------------------------
# Storage: in memory, one store per application instance.
# ---------------------------------------------------------------------------------------


@dataclass
class ItemStore:
    items: dict[int, Item] = field(default_factory=dict)
    next_id: int = 1  # never reused: a deleted item's URL must not start pointing at another

    def _check_name_free(self, name: str, ignore_id: int | None = None) -> None:
        wanted = name.casefold()
        for item in self.items.values():
            if item.id != ignore_id and item.name.casefold() == wanted:
                raise DuplicateItem()

    def add(self, data: ItemIn) -> Item:
        self._check_name_free(data.name)
        item = Item(id=self.next_id, **data.model_dump())
        self.items[item.id] = item
        self.next_id += 1
        return item

    def get(self, item_id: int) -> Item:
        try:
            return self.items[item_id]
        except KeyError:
            raise ItemNotFound(item_id) from None

    def replace(self, item_id: int, data: ItemIn) -> Item:
        self.get(item_id)
        self._check_name_free(data.name, ignore_id=item_id)
        item = Item(id=item_id, **data.model_dump())
        self.items[item_id] = item
        return item

    def delete(self, item_id: int) -> None:
        self.get(item_id)
        del self.items[item_id]

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        # Sort explicitly: a page is only meaningful if the order cannot shift between calls.
        ordered = sorted(self.items.values(), key=lambda item: item.id)
        return ordered[offset : offset + limit], len(ordered)


async def get_store(request: Request) -> ItemStore:
    return request.app.state.store


StoreDep = Annotated[ItemStore, Depends(get_store)]
Limit = Annotated[int, Query(ge=1, le=100, description="How many items per page (1-100).")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="How many items to skip.")]
ItemId = Annotated[int, Path(ge=1, le=MAX_ID, description="The id from the Location header of the create call.")]

# Every status an operation can answer is in the OpenAPI schema, as a problem. FastAPI answers
# 400 itself when a body cannot even be decoded (bytes that are not UTF-8).
NOT_FOUND = problem_responses(404)
CONFLICT = problem_responses(409)
UNREADABLE = problem_responses(400)
# Our 422 is a problem too; say so in the docs instead of FastAPI's default.
INVALID = problem_responses(422)

v1 = APIRouter(prefix="/api/v1", tags=["items v1"], responses=INVALID)
v2 = APIRouter(prefix="/api/v2", tags=["items v2"], responses=INVALID)

# ---------------------------------------------------------------------------------------
# Routes. Only two things differ between the versions: POST's Location and the list's
# shape. The routes on one item keep their contract, so one handler is registered on both
# routers (stacked decorators) instead of being copied.
# ---------------------------------------------------------------------------------------


@v1.post("/items", status_code=status.HTTP_201_CREATED, summary="Create an item", responses={**UNREADABLE, **CONFLICT})
async def create_item_v1(data: ItemIn, store: StoreDep, response: Response) -> Item:
    item = store.add(data)
    response.headers["Location"] = f"{v1.prefix}/items/{item.id}"
    return item


@v2.post("/items", status_code=status.HTTP_201_CREATED, summary="Create an item", responses={**UNREADABLE, **CONFLICT})
async def create_item_v2(data: ItemIn, store: StoreDep, response: Response) -> Item:
    item = store.add(data)
    response.headers["Location"] = f"{v2.prefix}/items/{item.id}"
    return item


@v1.get("/items", summary="List items")
async def list_items_v1(store: StoreDep, limit: Limit = 10, offset: Offset = 0) -> list[Item]:
    items, _ = store.page(offset, limit)
    return items


@v2.get("/items", summary="List items in a page envelope")
async def list_items_v2(store: StoreDep, limit: Limit = 10, offset: Offset = 0) -> ItemPage:
    items, total = store.page(offset, limit)
    more = offset + limit < total
    next_url = f"{v2.prefix}/items?limit={limit}&offset={offset + limit}" if more else None
    return ItemPage(items=items, total=total, limit=limit, offset=offset, next=next_url)


@v1.get("/items/{item_id}", summary="Read an item", responses=NOT_FOUND)
@v2.get("/items/{item_id}", summary="Read an item", responses=NOT_FOUND)
async def read_item(item_id: ItemId, store: StoreDep) -> Item:
    return store.get(item_id)


@v1.put("/items/{item_id}", summary="Replace an item", responses={**UNREADABLE, **NOT_FOUND, **CONFLICT})
@v2.put("/items/{item_id}", summary="Replace an item", responses={**UNREADABLE, **NOT_FOUND, **CONFLICT})
async def replace_item(item_id: ItemId, data: ItemIn, store: StoreDep) -> Item:
    return store.replace(item_id, data)


@v1.delete("/items/{item_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an item", responses=NOT_FOUND)
@v2.delete("/items/{item_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an item", responses=NOT_FOUND)
async def delete_item(item_id: ItemId, store: StoreDep) -> None:
    store.delete(item_id)


def create_app() -> FastAPI:
    """A new application with its own, empty store."""
    app = FastAPI(
        title="Catalogue",
        version="2.0.0",
        description="Items, served as /api/v1 (plain lists) and /api/v2 (page envelopes).",
    )
    app.state.store = ItemStore()
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(Exception, handle_unexpected)
    app.include_router(v1)
    app.include_router(v2)
    return app


app = create_app()
