"""Differential tests for exercise 10: for the same requests, your services answer as the reference's do.

The three services run together, as README.md shows the tests connect them: inventory, orders
reaching inventory through `upstream_transport`, and the gateway reaching both through
`transports`, each with its lifespan running. They are sent requests as one app: `/api/...` and
`/health` go to the gateway, `/stock/...` and `/events` to inventory, `/orders...` to orders.
The requests come from the three OpenAPI documents and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). A failure
shows the shortest sequence of requests found, both answers, and where they differ.

Timing is out of scope here (no failing upstream, budgets far from running out): the
hand-written tests cover timeouts, retries, breakers and bulkheads.
"""

from __future__ import annotations

import importlib
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from grader import differential

SERVICES = ("inventory", "orders", "gateway")
# Where each service is reached from the others (the transports make the URLs names only).
URLS = {"inventory": "http://inventory.test", "orders": "http://orders.test"}


class Services:
    """The three services of one copy (yours or the reference's) as one ASGI app.

    Its lifespan runs the three lifespans (inventory's first: orders calls it); a request goes to
    the service that owns its path, in the running app its lifespan made (which carries the state
    the lifespan yielded).
    """

    def __init__(self, modules: dict[str, Any]) -> None:
        inventory, orders, gateway = (modules[name] for name in SERVICES)
        self.running: dict[str, Any] = {}
        self.apps = {"inventory": inventory.create_app()}
        self.apps["orders"] = orders.create_app(
            orders.Settings(inventory_url=URLS["inventory"], timeout=5.0, retries=0, backoff=0.0),
            upstream_transport=httpx.ASGITransport(app=differential.Later(self, "inventory")))
        self.apps["gateway"] = gateway.create_app(
            gateway.Settings(orders_url=URLS["orders"], inventory_url=URLS["inventory"], timeout=5.0, retries=0, backoff=0.0),
            transports={name: httpx.ASGITransport(app=differential.Later(self, name)) for name in ("orders", "inventory")})

    @staticmethod
    def owner(path: str) -> str:
        if path.startswith(("/stock/", "/events")):
            return "inventory"
        if path == "/orders" or path.startswith("/orders/"):
            return "orders"
        return "gateway"

    def openapi(self) -> dict:
        """The three documents as one: the gateway's /health is the one compared."""
        merged: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": "Services", "version": "1"}, "paths": {},
                                  "components": {"schemas": {}}}
        for name in SERVICES:
            document = self.apps[name].openapi()
            for path, item in document.get("paths", {}).items():
                if self.owner(path) == name:
                    merged["paths"][path] = item
            for schema, body in document.get("components", {}).get("schemas", {}).items():
                merged["components"]["schemas"].setdefault(schema, body)
        return merged

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await self.running[self.owner(scope["path"])](scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                for name in SERVICES:
                    manager = await stack.enter_async_context(LifespanManager(self.apps[name], startup_timeout=10))
                    self.running[name] = manager.app
            except Exception as exc:  # noqa: BLE001 - a startup that fails is reported, like the app's own
                await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def build(module: Any) -> Services:
    """The three services of the copy `module` belongs to: its sibling modules, from its own package."""
    package = module.__name__.rpartition(".")[0]
    modules = {name: module if module.__name__.endswith(f".{name}") else importlib.import_module(f"{package}.{name}")
               for name in SERVICES}
    return Services(modules)


# How a differential run builds 10's apps (tests/test_differential.py uses it too).
SESSION_OPTIONS = {"app": build}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, module="gateway", **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
