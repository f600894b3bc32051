"""Exercise 10: the inventory service. It owns the stock and consumes OrderPlaced events.

Read README.md in this folder for the full interface. This file stands alone: do not import
orders.py or gateway.py (they are other services). It imports the given problems.py (the course's
error shape, a library every service ships with; do not edit it).
"""

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from .problems import install_problem_details, problem_responses

DEFAULT_STOCK: dict[str, int] = {"widget": 10, "gadget": 3, "gizmo": 0}


def create_app(stock: Mapping[str, int] | None = None, *, broker: Any = None) -> FastAPI:
    """An inventory service; `stock` replaces DEFAULT_STOCK, `broker` delivers OrderPlaced events."""
    levels = dict(DEFAULT_STOCK if stock is None else stock)  # a copy: apps never share stock

    # TODO: a lifespan that, when `broker` is given, subscribes a consumer:
    #       broker.subscribe("OrderPlaced", handler) with `async def handler(event: dict) -> None`.
    # TODO: every error a problem: install_problem_details(app) (README: "Errors are problems").
    app = FastAPI(title="Inventory")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "inventory"}

    # TODO: GET /stock/{sku} -> {"sku": ..., "available": ...}, or 404 (a problem).
    #       (`levels` holds the stock of this app.)

    # TODO: POST /events (an OrderPlaced event) -> 202 {"event_id": ..., "applied": true}.
    #       Delivery is at-least-once: remember the event_ids already applied, and answer
    #       {"applied": false} without changing anything when one comes again.
    del levels
    return app
