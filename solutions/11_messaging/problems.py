"""Problem details (RFC 9457): the one error shape of every service in this course.

You wrote this in lesson 3; from lesson 4 on it is given, the same file in every exercise.
Every error a service answers — its own, FastAPI's 422, Starlette's 404 for an unknown route
and 405 for a wrong method, an unexpected exception's 500 — has the media type
`application/problem+json` and this body:

    {"type": "about:blank", "title": "Not Found", "status": 404,
     "detail": "No book has the id 7.", "instance": "/books/7"}

- `type`   "about:blank" when the status says it all; else a URI the exercise's README names.
- `title`  the status's phrase for "about:blank"; else a fixed summary of the problem type.
- `status` the response's status code, repeated for whoever only keeps the body.
- `detail` one sentence for a human about this occurrence: never the refused input, a secret
           or a stack trace.
- `instance` the request's path (never its query string: that may carry personal data).
- `errors` on a 422 only: where, what and which rule — never the refused input.
"""

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"
ABOUT_BLANK = "about:blank"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The body of every error response (for `responses=`, so the OpenAPI schema says so)."""

    model_config = ConfigDict(extra="allow")  # a problem type may add members of its own

    type: str = ABOUT_BLANK
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise this for an error of the service's own: the handler below turns it into a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type: str = ABOUT_BLANK,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type
        self.title = title
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    type: str = ABOUT_BLANK,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """An `application/problem+json` response for this request."""
    body = {
        "type": type,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries declaring that these codes answer with a problem."""
    schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {code: {"model": Problem, "description": HTTPStatus(code).phrase, "content": {PROBLEM_JSON: schema}} for code in codes}


def allowed_methods(request: Request) -> str:
    """Every method some route accepts at this path (Starlette's own 405 names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(
        method for method in METHODS if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


async def problem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, exc.status, exc.detail, type=exc.type, title=exc.title, headers=exc.headers, **exc.extensions
    )


async def http_problem(request: Request, exc: Exception) -> Response:
    """HTTPException (yours and the framework's 404 and 405) as a problem, its headers kept."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code < 400:  # 304 Not Modified and friends carry no body at all
        return Response(status_code=exc.status_code, headers=headers)
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(request, exc.status_code, detail, headers=headers)


async def validation_problem(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 without the refused input: it may be a secret, or 1e309, which JSON cannot carry."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
    return problem_response(request, 422, "The request is not valid; see errors.", errors=errors)


async def unexpected_problem(request: Request, exc: Exception) -> Response:
    """A bug's 500, still a problem. Starlette re-raises the exception afterwards, so the
    server logs its traceback; the client learns nothing about the code."""
    return problem_response(request, 500, "The service failed to answer. The error is in its log.")


def install_problem_details(app: FastAPI) -> None:
    """Make every error of `app` a problem."""
    app.add_exception_handler(ProblemError, problem_error)
    app.add_exception_handler(StarletteHTTPException, http_problem)
    app.add_exception_handler(RequestValidationError, validation_problem)
    app.add_exception_handler(Exception, unexpected_problem)
