"""API gateway (lesson 10 reference): one public entrance that forwards to the right service.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes), not Python modules.
"""

import asyncio
import json
import logging
import math
import random
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import (
    PROBLEM_JSON,
    ProblemError,
    install_problem_details,
    problem_response,
    problem_responses,
    unexpected_problem,
)

logger = logging.getLogger("gateway")

REQUEST_ID_HEADER = "x-request-id"
# What a request ID may look like: it is written into every log line, so nothing else gets in.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
TIMEOUT_HEADER = "X-Timeout-Ms"  # how long the caller still waits, passed on to the next hop
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# A path parameter is exactly one plain segment. Letters, digits and - _ . ~ only, and no leading
# dot: "..", ".", "%2e%2e" (decoded before it gets here), "a/b", "a\\b", "%252e" and empty values
# can never match, so no value can climb out of its place in the upstream path.
SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}")
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
FORWARDED_RESPONSE_HEADERS = ("content-type", "location", "retry-after")


class Settings(BaseSettings):
    """Where each service lives; GATEWAY_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    orders_url: str = "http://127.0.0.1:8002"
    inventory_url: str = "http://127.0.0.1:8001"
    timeout: float = Field(default=2.0, gt=0, le=60)  # seconds for the whole answer, retries included
    retries: int = Field(default=1, ge=0, le=10)
    backoff: float = Field(default=0.05, ge=0, le=10)
    breaker_failures: int = Field(default=5, ge=1, le=1000)  # failed calls in a row that open a service's circuit
    breaker_reset: float = Field(default=10.0, gt=0, le=3600)  # seconds it stays open before one trial call
    max_concurrent: int = Field(default=64, ge=1, le=10_000)  # calls in flight per service (the bulkhead)
    # The largest body relayed either way, in bytes: a larger request is a 413 and is not sent;
    # a larger answer (once decoded) is a 502 and is read no further.
    max_body_bytes: int = Field(default=1_048_576, ge=1, le=1_073_741_824)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})
RETRY_AFTER_SECONDS = 1  # what our own 503 asks for: a restarting service is usually back by then

# The problem types of the gateway's own errors (README.md names them; orders uses the same
# ones); `service` says which service failed.
PROBLEMS = "https://course.example/problems/"
UPSTREAM_PROBLEMS = {
    502: ("bad-upstream", "Bad answer from an upstream service", "The {service} service answered with an error."),
    503: ("upstream-unavailable", "Upstream service unavailable", "The {service} service cannot be reached; try again later."),
    504: ("upstream-timeout", "Upstream service timed out", "The {service} service did not answer in time."),
}


class UpstreamError(ProblemError):
    """A service failed the gateway: unreachable or refused at once (503), too slow (504)."""

    def __init__(self, status_code: int, service: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        slug, title, detail = UPSTREAM_PROBLEMS[status_code]
        # A 503 tells its caller when to try again, so that retries do not come back at once.
        headers = {"Retry-After": str(retry_after)} if status_code == 503 else {}
        super().__init__(status_code, detail.format(service=service), type=PROBLEMS + slug, title=title,
                         headers=headers, service=service)
        self.status_code = status_code


def backoff_delay(backoff: float, attempt: int) -> float:
    """Exponential backoff with jitter: between 1 and 1.5 times backoff * 2**(attempt-1), so that
    many callers that failed together do not all retry at the same instant."""
    return backoff * 2 ** (attempt - 1) * (1 + random.random() / 2)


def retry_after(outcome: "httpx.Response | UpstreamError") -> float:
    """The seconds a 503 (or 429) asks its caller to wait before trying again: its Retry-After,
    in seconds or as an HTTP date; 0 when there is none or it makes no sense."""
    if not isinstance(outcome, httpx.Response) or outcome.status_code not in (429, 503):
        return 0.0
    value = outcome.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:  # "²".isdigit() too, and float("²") raises
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


class TooLarge(Exception):
    """An answer's body went past the gateway's limit."""


async def fetch(client: httpx.AsyncClient, method: str, url: str, *, limit: int, **kwargs: Any) -> httpx.Response:
    """One call, its answer read as it streams in: at most `limit` bytes of body (as decoded, so
    a small gzip that inflates to gigabytes counts for what it becomes). One byte more raises
    TooLarge and the rest is never read: a service that sends gigabytes costs `limit`, not them."""
    request = client.build_request(method, url, **kwargs)
    streamed = await client.send(request, stream=True)
    try:
        body = bytearray()
        async for chunk in streamed.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{method} {url}: the answer is longer than {limit} bytes")
    finally:
        await streamed.aclose()  # what was not read is dropped with the connection
    # The body is decoded now: Content-Encoding and Content-Length no longer describe it.
    kept = [(name, value) for name, value in streamed.headers.raw
            if name.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")]
    return httpx.Response(streamed.status_code, headers=kept, content=bytes(body), request=request)


async def call_upstream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    retries: int,
    backoff: float,
    deadline: float,
    limit: int,
    headers: dict[str, str],
    **kwargs: Any,
) -> httpx.Response:
    """Send a request; retry transient failures of idempotent methods only, with backoff, and
    all of it before `deadline` (a time of the event loop's clock).

    Each attempt tells the service how long the gateway will still wait (TIMEOUT_HEADER), keeping a
    tenth of it for the answer's way back, so that the service gives up when the gateway does.
    """
    loop = asyncio.get_running_loop()
    attempts = 1 + (retries if method.upper() in IDEMPOTENT_METHODS else 0)
    outcome: httpx.Response | UpstreamError = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, service)
    for attempt in range(attempts):
        if attempt:
            # The service may say how long it needs (Retry-After): never come back sooner.
            delay = max(backoff_delay(backoff, attempt), retry_after(outcome))
            if loop.time() + delay >= deadline:
                break  # no time left to wait and try again: answer with the last failure now
            await asyncio.sleep(delay)
        headers[TIMEOUT_HEADER] = str(max(0, int((deadline - loop.time()) * 900)))
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await fetch(client, method, url, limit=limit, headers=headers, **kwargs)
        except (httpx.TimeoutException, TimeoutError):
            outcome = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, service)
        except httpx.TransportError:
            outcome = UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, service)
        except (httpx.DecodingError, TooLarge):
            # An answer that cannot be read (a body that is not the gzip its Content-Encoding says,
            # or longer than the gateway relays): a broken answer, not a transient failure, and not
            # an httpx.TransportError either.
            raise UpstreamError(status.HTTP_502_BAD_GATEWAY, service) from None
        if isinstance(outcome, httpx.Response) and outcome.status_code not in RETRYABLE_STATUS:
            return outcome
        logger.warning("%s %s to %s failed (attempt %d of %d): %s", method, url, service, attempt + 1, attempts,
                       outcome.status_code if isinstance(outcome, httpx.Response) else outcome)
    if isinstance(outcome, httpx.Response):
        return outcome  # the service's own 502/503/504, after the retries: passed on as it is
    raise outcome


class CircuitBreaker:
    """Stops calling a service that keeps failing, and tries it again after a while.

    Closed: calls go through; `failures` failed calls in a row open it. Open: for `reset` seconds
    every call is refused at once, without touching the service, which gets time to recover
    instead of a queue of callers waiting on it. Then half-open: one trial call goes through (the
    others are still refused); its success closes the circuit, its failure opens it again.
    """

    def __init__(self, failures: int, reset: float) -> None:
        self.threshold, self.reset = failures, reset
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_running = False

    def retry_after(self, now: float) -> float:
        """0 when a call may go through now, else the seconds until the circuit lets one through."""
        if self.opened_at is None:
            return 0.0
        left = self.opened_at + self.reset - now
        if left > 0:
            return left
        return self.reset if self.trial_running else 0.0

    def allow(self, now: float) -> bool:
        if self.retry_after(now) > 0:
            return False
        if self.opened_at is not None:
            self.trial_running = True  # half-open: this call is the one trial
        return True

    def record(self, ok: bool, now: float) -> None:
        self.trial_running = False
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now  # opened, or a failed trial: open again for `reset`


class RequestIdMiddleware:
    """At the edge: reuse the caller's X-Request-ID when it is well formed, else create one; return it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if not started:
                # A bug's 500 is answered here, through send_with_id, so that it carries the request
                # ID too: Starlette's ServerErrorMiddleware, which would answer it otherwise, runs
                # outside every middleware of ours. Then re-raised: the server logs the traceback.
                response = await unexpected_problem(Request(scope), exc)
                await response(scope, receive, send_with_id)
            raise
        finally:
            request_id_var.reset(token)


def no_route(request: Request) -> JSONResponse:
    return problem_response(request, status.HTTP_404_NOT_FOUND, "No service answers this path.")


def not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: Python reads it as inf, which JSON cannot carry
        raise ValueError(f"{text} is out of range")
    return value


def relayed(upstream: httpx.Response, request: Request, service: str) -> bytes:
    """The service's answer, as it is; in a problem only `instance` changes, to the path the client
    sent (the client knows the gateway's paths, not the service's), as a Location header does.

    A problem has to be read to be rewritten, and what the gateway sends must be JSON every client
    can parse: so it is read as strict JSON (UTF-8; Python's json alone also takes NaN, Infinity
    and 1e400, then writes them back as NaN and Infinity, which no other parser accepts). A problem
    that is not strict JSON, or is nested too deep to read, is a broken answer: 502.
    """
    if upstream.headers.get("content-type", "").split(";")[0].strip().lower() != PROBLEM_JSON:
        return upstream.content  # not read at all: relayed byte for byte
    try:
        problem = json.loads(upstream.content.decode("utf-8"), parse_constant=not_json, parse_float=finite)
        if isinstance(problem, dict) and isinstance(problem.get("instance"), str):
            problem["instance"] = request.url.path
            return json.dumps(problem, allow_nan=False).encode()
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UpstreamError(status.HTTP_502_BAD_GATEWAY, service) from None
    return upstream.content


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or a 413 as soon as it is longer than `limit`: never gigabytes in memory."""
    declared = request.headers.get("content-length", "")
    too_large = ProblemError(status.HTTP_413_CONTENT_TOO_LARGE, f"The body is longer than {limit} bytes.")
    if re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


# What the gateway itself may answer (each a problem), on top of whatever the service answers:
# 404 off the allow-list, 413 a body too long, 502 an answer it cannot read (or the service's),
# 503 unreachable / circuit open / bulkhead full, 504.
GATEWAY_ERRORS = problem_responses(404, 413, 502, 503, 504)


def create_app(
    settings: Settings | None = None, *, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> FastAPI:
    """A gateway to orders and inventory. `transports` maps a service name to the transport
    that reaches it (tests use ASGITransport or a fake); a missing entry means the network."""
    settings = settings or Settings()
    transports = transports or {}
    urls = {"orders": settings.orders_url, "inventory": settings.inventory_url}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            clients = {
                name: await stack.enter_async_context(
                    httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(settings.timeout), transport=transports.get(name))
                )
                for name, url in urls.items()
            }
            # One breaker and one bulkhead per service: a failing or saturated inventory must not
            # stop orders from being placed.
            breakers = {name: CircuitBreaker(settings.breaker_failures, settings.breaker_reset) for name in urls}
            bulkheads = {name: asyncio.Semaphore(settings.max_concurrent) for name in urls}
            yield {"clients": clients, "breakers": breakers, "bulkheads": bulkheads}

    # redirect_slashes=False: /api/orders/ is not on the allow-list, so it is a 404, not a redirect to a route that is.
    app = FastAPI(title="Gateway", version="1.0.0", lifespan=lifespan, redirect_slashes=False)
    install_problem_details(app)  # every error a problem: its own, and Starlette's 404 and 405
    app.add_middleware(RequestIdMiddleware)

    async def forward(request: Request, service: str, template: str, **params: str) -> Response:
        """Forward to `template` at `service`, each parameter put in as one encoded path segment.

        The upstream path is built from the allow-listed template, never from the client's path:
        a value that is not one plain segment is refused before anything is sent.
        """
        if not all(SEGMENT.fullmatch(value) for value in params.values()):
            return no_route(request)
        path = template.format(**{name: quote(value, safe="") for name, value in params.items()})
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        headers["X-Request-ID"] = request_id_var.get()  # passed on, so logs of every hop match
        content = await read_body(request, settings.max_body_bytes)  # before a slot of the bulkhead is taken
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout  # one budget for everything below
        breaker: CircuitBreaker = request.state.breakers[service]
        bulkhead: asyncio.Semaphore = request.state.bulkheads[service]
        if bulkhead.locked() or not breaker.allow(loop.time()):
            # Refused at once, the service untouched: it is failing (the circuit is open) or as busy
            # as we let it be (the bulkhead is full). Retry-After says when to come back.
            wait = max(1, math.ceil(breaker.retry_after(loop.time())))
            raise UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, service, retry_after=wait)
        async with bulkhead:
            succeeded: bool | None = None
            try:
                upstream = await call_upstream(
                    request.state.clients[service], request.method, path,
                    service=service, retries=settings.retries, backoff=settings.backoff, deadline=deadline,
                    limit=settings.max_body_bytes, params=request.query_params.multi_items(), content=content,
                    headers=headers,
                )
                # A problem the gateway cannot read is a 502 here, inside: an upstream that answers
                # garbage is failing, and counts against its circuit like one that is down.
                body = relayed(upstream, request, service)
                succeeded = upstream.status_code not in RETRYABLE_STATUS
            except UpstreamError:
                succeeded = False
                raise  # a problem of the gateway's own (installed handler)
            finally:
                if succeeded is None:  # cancelled (the client left): no verdict on the service
                    breaker.trial_running = False
                else:
                    breaker.record(succeeded, loop.time())
        response = Response(content=body, status_code=upstream.status_code)
        # The promised headers, copied as the service sent them, byte for byte. Decoding them to
        # text and encoding them again is a round trip that can fail: a Location of "/orders/€" in
        # UTF-8 is not Latin-1, the only encoding Starlette writes headers in (a 500).
        for name, value in upstream.headers.raw:
            name = name.lower()
            if name.decode("latin-1") in FORWARDED_RESPONSE_HEADERS:
                if name == b"location" and value.startswith(b"/"):
                    value = b"/api" + value  # the client only knows the gateway's paths
                response.raw_headers.append((name, value))
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    # The allow-list: exactly these methods and paths reach a service. Anything else, including
    # the services' internal routes (inventory's POST /events), is refused here (404, or 405).

    @app.get("/api/stock/{sku}", responses={200: {"description": "Inventory's answer"}, **GATEWAY_ERRORS})
    async def read_stock(sku: str, request: Request) -> Response:
        return await forward(request, "inventory", "/stock/{sku}", sku=sku)

    @app.post(
        "/api/orders",
        status_code=status.HTTP_201_CREATED,
        # What orders answers, passed on (its problems too), and the gateway's own errors.
        responses={201: {"description": "The order, placed"}, **problem_responses(400, 409, 422), **GATEWAY_ERRORS},
    )
    async def place_order(request: Request) -> Response:
        return await forward(request, "orders", "/orders")

    @app.get("/api/orders/{order_id}", responses={200: {"description": "The order"}, **GATEWAY_ERRORS})
    async def read_order(order_id: str, request: Request) -> Response:
        return await forward(request, "orders", "/orders/{order_id}", order_id=order_id)

    # Nothing else: the router answers any other path 404 and another method on these paths 405
    # (with Allow), both problems (install_problem_details), and nothing is forwarded.
    return app
